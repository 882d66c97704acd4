//! End-to-end parity with diffusers pipelines (tests/fixtures/golden/pipelines, made by
//! tools/fixtures/pipelines.py): the noise diffusers drew is replayed in its order, and the final
//! latents and decoded images must match (≤ 1e-3).

use crate::common::fixtures;
use serde_json::Value;
use std::collections::VecDeque;
use toffee::backend::Device;
use toffee::models::adapter::Adapter;
use toffee::models::load::load_unet;
use toffee::pipeline::noise::NoiseSource;
use toffee::pipeline::{Control, Generator, ImagePrompt, Init, Request};
use toffee::tensor::Tensor;
use toffee::weights::lora::LoraSpec;
use toffee::weights::safetensors::read_all;

fn run_case(name: &str) {
    run_case_with("golden/pipelines", name, false);
    // The GPU loop (scheduler as tensor ops, latents kept where the model runs), on the CPU.
    run_case_with("golden/pipelines", name, true);
}

/// IP-Adapter pipelines (tools/fixtures/adapters.py): diffusers given `ip_adapter_image_embeds`
/// ([negative; positive] rows) and `set_ip_adapter_scale`.
fn run_adapter_case(name: &str) {
    run_case_with("golden/adapters", name, false);
    run_case_with("golden/adapters", name, true);
}

/// Toffee Refiner / ToffeeNet pipelines (tools/fixtures/toffee.py): the subject image goes
/// through the adapter's DINO encoder here, so the whole chain is checked.
fn run_toffee_case(name: &str) {
    run_case_with("golden/toffee", name, false);
    run_case_with("golden/toffee", name, true);
}

/// The image prompt of a case's `toffee_adapter`, made from its subject image by the engine
/// (processor, DINO encoder, token selection), checked against the reference's tokens.
fn attach_toffee(
    gen: &mut Generator,
    spec: &Value,
    t: &std::collections::BTreeMap<String, Tensor>,
) -> Vec<ImagePrompt> {
    use toffee::pipeline::image_prompt::{image_prompt, load_encoder};
    let root = fixtures();
    let adapter =
        Adapter::load(&root.join(spec["folder"].as_str().unwrap()), &Device::Cpu).unwrap();
    let enc_dir = root.join(spec["image_encoder"].as_str().unwrap());
    let enc = load_encoder(&adapter, Some(&enc_dir), &Device::Cpu).unwrap();
    let subject =
        toffee::image_proc::load_rgb8(&root.join(spec["subject_image"].as_str().unwrap())).unwrap();
    let scale = spec["scale"].as_f64().unwrap() as f32;
    let layers = gen.unet.cross_attention_layers();
    let p = image_prompt(&adapter, &enc, &subject, scale, layers).unwrap();
    let err = p.positive.max_abs_diff(&t["image_tokens"]);
    assert!(
        err <= 1e-4,
        "image tokens differ from the reference's by {err}"
    );
    assert_eq!(
        p.negative.data(),
        t["negative_image_tokens"].data(),
        "negative tokens"
    );
    gen.attach_adapter(adapter).unwrap();
    vec![p]
}

/// The image prompts of a case's `ip_adapters`, attached to `gen` in order.
fn attach_adapters(
    gen: &mut Generator,
    case: &Value,
    t: &std::collections::BTreeMap<String, Tensor>,
) -> Vec<ImagePrompt> {
    if let Some(spec) = case.get("toffee_adapter") {
        return attach_toffee(gen, spec, t);
    }
    let Some(list) = case.get("ip_adapters").and_then(Value::as_array) else {
        return Vec::new();
    };
    let layer_scales = case["ip_layer_scales"].as_array().unwrap();
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let ad =
                Adapter::load(&fixtures().join(a["file"].as_str().unwrap()), &Device::Cpu).unwrap();
            gen.attach_adapter(ad).unwrap();
            let e = &t[a["embeds"].as_str().unwrap()];
            assert_eq!(e.shape()[0], 2, "[negative; positive]");
            ImagePrompt {
                negative: e.narrow0(0, 1),
                positive: e.narrow0(1, 1),
                scales: layer_scales
                    .iter()
                    .map(|l| l["scale"][i].as_f64().unwrap() as f32)
                    .collect(),
            }
        })
        .collect()
}

fn run_case_with(golden_dir: &str, name: &str, tensor_scheduler: bool) {
    let dir = fixtures().join(golden_dir);
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let t = read_all(&dir.join(format!("{name}.safetensors"))).unwrap();
    let root = fixtures();
    let cn = case
        .get("controlnet")
        .and_then(Value::as_str)
        .map(|c| root.join(c));
    // LoRA cases (golden/lora): diffusers' fuse_lora(lora_scale) × each adapter's weight.
    let lora_scale = case
        .get("lora_scale")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let loras: Vec<LoraSpec> = case
        .get("loras")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|l| LoraSpec {
                    path: root.join(l["file"].as_str().unwrap()),
                    scale: (lora_scale
                        * l.get("adapter_weight")
                            .and_then(Value::as_f64)
                            .unwrap_or(1.0)) as f32,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut gen = Generator::load_with_loras(
        &root.join(case["model"].as_str().unwrap()),
        cn.as_deref(),
        &loras,
        &toffee::backend::Device::Cpu,
    )
    .unwrap();
    gen.tensor_scheduler = tensor_scheduler;
    if let Some(u) = case.get("unet").and_then(Value::as_str) {
        gen.unet = load_unet(&root.join(u), &toffee::backend::Device::Cpu).unwrap();
    }
    let strs = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let nhwc = |k: &str| t[k].to_nhwc();
    let strength = case.get("strength").and_then(Value::as_f64).unwrap_or(1.0);
    let init = match case["pipeline"].as_str().unwrap() {
        "txt2img" => Init::Noise,
        "img2img" => Init::Image {
            image: nhwc("init_image"),
            strength,
        },
        "inpaint" => Init::Inpaint {
            image: nhwc("init_image"),
            mask: nhwc("mask_image"),
            strength,
        },
        other => panic!("unknown pipeline {other}"),
    };
    let control = t.get("control_image").map(|c| Control {
        image: c.to_nhwc(),
        scale: case["controlnet_conditioning_scale"].as_f64().unwrap() as f32,
    });
    let req = Request {
        prompts: strs(&case["prompts"]),
        negative: case["negative_prompts"]
            .as_array()
            .map(|_| strs(&case["negative_prompts"])),
        images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap() as usize,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance_scale"].as_f64().unwrap() as f32,
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        scheduler: case["scheduler"]["override"]
            .as_str()
            .map(|s| s.parse().unwrap()),
        seed: 0,
        batch: 64,
        init,
        control,
        init_latents: None,
        image_prompts: attach_adapters(&mut gen, &case, &t),
    };
    let calls = case["noise_calls"].as_array().unwrap().len();
    let mut noise: VecDeque<Tensor> = (0..calls)
        .map(|i| t[&format!("noise.{i}")].clone())
        .collect();
    if case["scheduler"]["override"] == "lcm" {
        // diffusers draws no noise for LCM's last step; the engine draws one it does not use
        // (NaN proves it unused).
        let l = &t["noise.0"];
        noise.push_back(Tensor::new(l.shape(), vec![f32::NAN; l.numel()]));
    }
    let mut source = NoiseSource::Recorded(noise);
    let total = req.total_images();
    let mut steps_seen = 0;
    let out = gen
        .run_chunk(&req, 0, total, &mut source, &mut |_, _| steps_seen += 1)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(
        source.remaining(),
        0,
        "{name}: diffusers drew more noise than the pipeline used"
    );
    assert_eq!(
        steps_seen,
        case["timesteps"].as_array().unwrap().len(),
        "{name}: number of denoising steps"
    );
    let lat_err = out.latents.to_nchw().max_abs_diff(&t["latents"]);
    let img_err = out.images.to_nchw().max_abs_diff(&t["image"]);
    let lat_scale = t["latents"]
        .data()
        .iter()
        .fold(0.0f32, |a, v| a.max(v.abs()));
    eprintln!(
        "{name}: latents max abs err {lat_err:.2e} (max |x| {lat_scale:.2}), image {img_err:.2e}"
    );
    assert!(
        lat_err <= 1e-3,
        "{name}: final latents differ by {lat_err:e}"
    );
    assert!(
        img_err <= 1e-3,
        "{name}: decoded images differ by {img_err:e}"
    );
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { run_case(stringify!($name)); } )* };
}

cases!(
    sd1_txt2img_ddim,
    sd1_txt2img_euler,
    sd1_txt2img_dpmpp,
    sd1_txt2img_dpmpp_karras,
    sd1_txt2img_euler_a,
    sd1_txt2img_pndm,
    sd2_txt2img_ddim,
    sd2_txt2img_euler,
    sdxl_txt2img_euler,
    sdxl_txt2img_negative,
    sd1_controlnet_ddim,
    sdxl_controlnet_euler,
    sd1_img2img_ddim,
    sd1_img2img_euler,
    sd1_inpaint_4ch,
    sd1_inpaint_4ch_strength,
    inpaint_9ch,
    inpaint_9ch_strength,
);

macro_rules! adapter_cases {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { run_adapter_case(stringify!($name)); } )* };
}

adapter_cases!(
    sd1_ip_txt2img,
    sd1_ip_plus_txt2img,
    sd1_ip_img2img,
    inpaint_9ch_ip,
    sdxl_ip_txt2img,
);

macro_rules! toffee_cases {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { run_toffee_case(stringify!($name)); } )* };
}

toffee_cases!(
    toffeenet_generate,
    toffeenet_edit,
    toffeenet_depth,
    refiner_img2img
);

/// An LCM-distilled UNet (`time_cond_proj_dim`) against diffusers' LatentConsistencyModelPipeline
/// (tools/fixtures/few_step.py): guidance 8 goes in as the w-embedding through `cond_proj`, in one
/// batch without classifier-free guidance, 4 LCM steps; through the reference and the tensor-op
/// scheduler paths.
#[test]
fn sd1_lcm_unet() {
    let dir = fixtures().join("golden/few_step");
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sd1_lcm_unet.json")).unwrap())
            .unwrap();
    let t = read_all(&dir.join("sd1_lcm_unet.safetensors")).unwrap();
    let root = fixtures();
    for tensor_scheduler in [false, true] {
        let mut gen = Generator::load(
            &root.join(case["model"].as_str().unwrap()),
            None,
            &Device::Cpu,
        )
        .unwrap();
        gen.tensor_scheduler = tensor_scheduler;
        gen.unet = load_unet(&root.join(case["unet"].as_str().unwrap()), &Device::Cpu).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let req = Request {
            prompts: vec![case["prompt"].as_str().unwrap().to_string()],
            negative: None,
            images_per_prompt: 1,
            steps,
            guidance: case["guidance_scale"].as_f64().unwrap() as f32,
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            scheduler: Some(case["scheduler"].as_str().unwrap().parse().unwrap()),
            seed: 0,
            batch: 64,
            init: Init::Noise,
            control: None,
            init_latents: None,
            image_prompts: Vec::new(),
        };
        // Initial latents, then one noise per step: diffusers draws none for the last LCM step,
        // which the engine draws but does not use; a NaN tensor there proves it unused.
        let mut noise: VecDeque<Tensor> = (0..steps)
            .map(|i| t[&format!("noise.{i}")].clone())
            .collect();
        let last = &t["noise.0"];
        noise.push_back(Tensor::new(last.shape(), vec![f32::NAN; last.numel()]));
        let mut source = NoiseSource::Recorded(noise);
        let out = gen
            .run_chunk(&req, 0, 1, &mut source, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(source.remaining(), 0);
        let err = out.latents.to_nchw().max_abs_diff(&t["latents"]);
        let scale = t["latents"]
            .data()
            .iter()
            .fold(0.0f32, |a, v| a.max(v.abs()));
        eprintln!("sd1_lcm_unet (tensor scheduler {tensor_scheduler}): latents max abs err {err:.2e} (max |x| {scale:.2})");
        assert!(err <= 1e-3, "final latents differ by {err:e}");
    }
}

macro_rules! lora_cases {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() {
        run_case_with("golden/lora", stringify!($name), false);
        run_case_with("golden/lora", stringify!($name), true);
    } )* };
}

// LoRAs fused at load against diffusers' load_lora_weights + fuse_lora (tools/fixtures/lora.py);
// lcm_lora: an LCM-LoRA-style run, 4 LCM steps without CFG.
lora_cases!(lora_sd1_txt2img, lora_sdxl_txt2img, lcm_lora);
