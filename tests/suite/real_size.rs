//! A full-size SD1.5 UNet checkpoint (random fp16 weights in diffusers' real layout, written to a
//! temp dir) loads with the right parameter count and without holding the file twice in memory.

use std::io::Write;
use std::path::Path;
use std::process::Command;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Writes a safetensors file of random fp16 tensors with the given names and shapes.
fn write_random_f16(path: &Path, tensors: &[(String, Vec<usize>)]) -> u64 {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut left = off / 2;
    while left > 0 {
        let k = left.min(1 << 19);
        buf.clear();
        for _ in 0..k {
            let r = (xorshift(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            buf.extend_from_slice(&half::f16::from_f32(r * 0.1).to_le_bytes());
        }
        f.write_all(&buf).unwrap();
        left -= k;
    }
    f.flush().unwrap();
    (8 + h.len() + off) as u64
}

fn children_peak_rss_bytes() -> u64 {
    // Safety: plain getrusage call with a zeroed out-struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss as u64 * 1024
}

#[test]
fn full_size_sd15_unet_loads_once() {
    let layout: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd15_unet_layout.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let tensors: Vec<(String, Vec<usize>)> = layout["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect();
    let params: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(
        params, 859_520_964,
        "the layout file itself must describe SD1.5"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string_pretty(&layout["config"]).unwrap(),
    )
    .unwrap();
    let file_bytes = write_random_f16(
        &dir.path().join("diffusion_pytorch_model.safetensors"),
        &tensors,
    );

    let before = children_peak_rss_bytes();
    let out = Command::new(env!("CARGO_BIN_EXE_toffee"))
        .args(["inspect", "--load"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inspect --load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("859,520,964 parameters"), "{stdout}");
    assert!(stdout.contains("SD1.x-style"), "{stdout}");
    assert!(stdout.contains("loaded: ok"), "{stdout}");

    let peak = children_peak_rss_bytes();
    assert!(peak > before, "the child's peak RSS was measured");
    // The CPU backend keeps f32 weights (4 bytes per parameter). A loader that also kept the file
    // resident (mapped pages or a read buffer) would add file_bytes (1.7 GB) on top.
    let f32_bytes = params as u64 * 4;
    let limit = f32_bytes + file_bytes / 4 + (200 << 20);
    eprintln!(
        "peak RSS {:.2} GB; f32 weights {:.2} GB; file {:.2} GB; limit {:.2} GB",
        gb(peak),
        gb(f32_bytes),
        gb(file_bytes),
        gb(limit)
    );
    assert!(
        peak < limit,
        "peak RSS {:.2} GB exceeds {:.2} GB: the checkpoint is held twice",
        gb(peak),
        gb(limit)
    );
}

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

/// `pairs --check` builds a full-size SD1.5 UNet from its header alone (`weights::shapes_only`):
/// every tensor checked by name and shape, none read — under a second and well under the f32
/// model's 3.4 GB. The data region is a sparse file: nothing is read from it.
#[test]
fn pairs_check_builds_a_full_size_unet_from_its_header() {
    let layout: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::common::fixtures().join("sd15_unet_layout.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The tiny SD1 pipeline with the full-size UNet in it: the check gets through the UNet and
    // stops at the text encoder's width (16 against 768), after every UNet tensor was checked.
    let pipe = dir.path().join("sd15");
    crate::common::copy_tree(&crate::common::fixtures().join("sd1"), &pipe);
    let unet = pipe.join("unet");
    std::fs::remove_dir_all(&unet).unwrap();
    std::fs::create_dir(&unet).unwrap();
    std::fs::write(
        unet.join("config.json"),
        serde_json::to_string(&layout["config"]).unwrap(),
    )
    .unwrap();
    let write = |damage: Option<&str>| {
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for (name, shape) in layout["tensors"].as_object().unwrap() {
            let mut shape: Vec<usize> = shape
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            if Some(name.as_str()) == damage {
                shape.reverse();
            }
            let n = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let mut f =
            std::fs::File::create(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&h).unwrap();
        f.set_len((8 + h.len() + off) as u64).unwrap();
    };
    let f = crate::common::fixtures();
    let cfg = dir.path().join("pairs.toml");
    std::fs::write(
        &cfg,
        format!(
            "[models]\ndraft = \"{}\"\ncontrolnet = \"{}\"\nrefiner_adapter = \"{}\"\n\
             refiner_adapter_encoder = \"{}\"\ndino = \"{}\"\nclip = \"{}\"\n",
            pipe.display(),
            f.join("controlnet-sd1").display(),
            f.join("adapters/ip-adapter-sd1.safetensors").display(),
            f.join("vision/clip-vision-proj").display(),
            f.join("vision/dinov2").display(),
            f.join("vision/clip").display(),
        ),
    )
    .unwrap();
    let run = || -> (String, u64, f64) {
        let clock = std::time::Instant::now();
        // Reaped by wait4 below (std's wait would not return the child's own rusage).
        #[allow(clippy::zombie_processes)]
        let mut child = Command::new(env!("CARGO_BIN_EXE_toffee"))
            .args(["pairs", "--check", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(dir.path().join("out"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        // wait4: this child's own peak RSS (other tests' children run beside it).
        let mut status = 0;
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut ru) }, pid);
        (
            err,
            ru.ru_maxrss as u64 * 1024,
            clock.elapsed().as_secs_f64(),
        )
    };
    write(None);
    let (err, peak, secs) = run();
    eprintln!(
        "check of a full-size UNet: {secs:.2} s, peak RSS {:.2} GB",
        gb(peak)
    );
    assert!(err.contains("cross_attention_dim is 768"), "{err}");
    assert!(
        peak < 1 << 30,
        "peak RSS {:.2} GB: weights were materialised",
        gb(peak)
    );
    let deep = "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight";
    write(Some(deep));
    let (err, _, _) = run();
    assert!(err.contains(deep) && err.contains("has shape"), "{err}");
}
