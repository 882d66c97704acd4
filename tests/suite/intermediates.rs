//! Per-block UNet activations against diffusers' (recorded with forward hooks), so a mismatch in
//! the final output can be localised to the first block that diverges.

use std::path::Path;
use toffee::models::load::load_unet;
use toffee::models::unet::{Cond, Trace};
use toffee::weights::safetensors::read_all;

fn check(case: &str, model: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let g = root.join("golden");
    let inputs = read_all(&g.join(format!("{case}.in.safetensors"))).unwrap();
    let want = read_all(&g.join(format!("{case}.intermediates.safetensors"))).unwrap();
    let unet = load_unet(&root.join(model), &toffee::backend::Device::Cpu).unwrap();
    let sample = inputs["sample"].to_nhwc();
    let ts = inputs["timestep"].clone();
    let tt = inputs
        .get("text_embeds")
        .map(|te| (te, &inputs["time_ids"]));
    let cond = Cond {
        timesteps: &ts,
        context: &inputs["encoder_hidden_states"],
        text_time: tt,
        ip: &[],
        timestep_cond: None,
    };
    let mut trace: Trace = Vec::new();
    unet.forward(&sample, &cond, None, Some(&mut trace))
        .unwrap();
    let mut checked = 0;
    for (name, t) in &trace {
        let Some(w) = want.get(name) else { continue };
        let t = if t.rank() == 4 {
            t.to_nchw()
        } else {
            t.clone()
        };
        let err = t.max_abs_diff(w);
        assert!(
            err <= 1e-4,
            "{case}: first divergence at `{name}`: max abs error {err:e}"
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        want.len(),
        "{case}: every recorded intermediate has a counterpart in the trace"
    );
}

#[test]
fn sd1_unet_blocks_match() {
    check("sd1_unet", "sd1");
}

#[test]
fn sdxl_unet_blocks_match() {
    check("sdxl_unet", "sdxl");
}
