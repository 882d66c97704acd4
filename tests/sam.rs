//! SAM (transformers `SamModel` + `SamProcessor`) against the goldens of
//! tools/fixtures/segment_depth.py (tests/fixtures/golden/segment_depth): fp32 CPU, max abs error
//! ≤ 1e-4; the processor, post-processing and the CLI.

mod common;

use common::fixtures;
use std::collections::BTreeMap;
use std::path::PathBuf;
use toffee::backend::Device;
use toffee::models::sam::{Prompts, Sam};
use toffee::tensor::Tensor;
use toffee::weights::safetensors::read_all;

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/segment_depth").join(name)
}

fn model_dir() -> PathBuf {
    fixtures().join("segment_depth/sam")
}

fn read(name: &str) -> BTreeMap<String, Tensor> {
    read_all(&golden(name)).unwrap()
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    common::assert_close(what, got, want, tol);
}

fn model_case(name: &str, boxes: bool, multimask: bool) {
    let sam = Sam::load_dir(&model_dir(), &Device::Cpu).unwrap();
    let inp = read("sam.in.safetensors");
    let want = read(&format!("{name}.out.safetensors"));
    let px = inp["pixel_values"].to_nhwc();
    let prompts = if boxes {
        Prompts::new(1, None, None, Some(&inp["input_boxes"])).unwrap()
    } else {
        Prompts::new(
            1,
            Some(&inp["input_points"]),
            Some(&inp["input_labels"]),
            None,
        )
        .unwrap()
    };
    let out = sam.forward(&px, &prompts, multimask).unwrap();
    close(
        &format!("{name}/image_embeddings"),
        &out.image_embeddings.to_host().unwrap().to_nchw(),
        &want["image_embeddings"],
        1e-4,
    );
    close(&format!("{name}/pred_masks"), &out.pred_masks, &want["pred_masks"], 1e-4);
    close(&format!("{name}/iou_scores"), &out.iou_scores, &want["iou_scores"], 1e-4);
}

#[test]
fn sam_boxes_multimask_true() {
    model_case("sam_boxes_multimask_true", true, true);
}

#[test]
fn sam_boxes_multimask_false() {
    model_case("sam_boxes_multimask_false", true, false);
}

#[test]
fn sam_points_multimask_true() {
    model_case("sam_points_multimask_true", false, true);
}

#[test]
fn sam_points_multimask_false() {
    model_case("sam_points_multimask_false", false, false);
}
