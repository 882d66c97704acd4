//! With the `cuda` feature, compiles kernels/*.cu with nvcc into fatbins (SASS for sm_80 and sm_90,
//! PTX for compute_90) that the binary embeds. With the `emu` feature, compiles the same files as
//! host C++ under the shim in kernels/emu/ (the software GPU). Without either, does nothing: the
//! default build needs no CUDA toolkit at all.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    pkg_config();
    #[cfg(feature = "cuda")]
    cuda::build();
    #[cfg(feature = "emu")]
    emu::build();
}

/// kernels/*.cu, sorted: one module each.
#[cfg(any(feature = "cuda", feature = "emu"))]
fn kernel_sources() -> Vec<std::path::PathBuf> {
    let kdir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    println!("cargo:rerun-if-changed={}", kdir.display());
    let mut sources: Vec<_> = std::fs::read_dir(&kdir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources
}

/// The software GPU: every kernels/*.cu compiled as host C++ with the shim (kernels/emu/emu.h
/// force-included, `TOFFEE_EMU` defined), plus a launch table per module that the emu driver
/// (src/backend/cuda/emu) loads kernels from by name.
#[cfg(feature = "emu")]
mod emu {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The two rewrites macros cannot express: `extern __shared__ T name[];` becomes the block's
    /// dynamic shared memory, a static `__shared__ T name[dims];` a reference into the block's
    /// shared window (so range and alignment checks and the NaN fill cover both). One line in,
    /// one line out, so compiler messages keep the kernel's line numbers.
    pub fn rewrite_shared(src: &str) -> String {
        // `__shared__ T a[N], b[M];` first becomes one declaration per name.
        let several = regex::Regex::new(
            r"(__shared__ (?:__align__\(\d+\) )?[\w:<>]+(?: [\w:<>]+)*?) (\w+(?:\[[^\]]+\])+(?:, *\w+(?:\[[^\]]+\])+)+);",
        )
        .unwrap();
        let one = regex::Regex::new(r"\w+(?:\[[^\]]+\])+").unwrap();
        let src = several.replace_all(src, |c: &regex::Captures| {
            one.find_iter(&c[2])
                .map(|m| format!("{} {};", &c[1], m.as_str()))
                .collect::<Vec<_>>()
                .join(" ")
        });
        let dynamic =
            regex::Regex::new(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")
                .unwrap();
        let s = dynamic.replace_all(&src, "$1* $2 = ($1*)::emu::dyn_smem();");
        let fixed = regex::Regex::new(
            r"__shared__ (?:__align__\((\d+)\) )?([\w:<>]+(?: [\w:<>]+)*?) (\w+)((?:\[[^\]]+\])+);",
        )
        .unwrap();
        fixed
            .replace_all(&s, |c: &regex::Captures| {
                let align = c.get(1).map_or("16", |m| m.as_str());
                let (ty, name, dims) = (&c[2], &c[3], &c[4]);
                format!(
                    "{ty} (&{name}){dims} = *::emu::shared_var<{ty}{dims}, {align}>([] {{ static char tag; return (const void*)&tag; }}());"
                )
            })
            .into_owned()
    }

    /// The extern "C" kernels a preprocessed translation unit defines in kernels/ files.
    fn kernel_names(preprocessed: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut ours = false;
        for line in preprocessed.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                // Line markers: `# 12 "path" flags`.
                let file = rest.split('"').nth(1).unwrap_or("");
                ours =
                    (file.ends_with(".cu") || file.ends_with(".cu.cpp") || file.ends_with(".cuh"))
                        && !file.contains("/emu/");
                continue;
            }
            if !ours {
                continue;
            }
            let mut rest = line;
            while let Some(i) = rest.find("extern \"C\"") {
                rest = &rest[i + 10..];
                let t = rest.trim_start();
                if let Some(t) = t.strip_prefix("void") {
                    let t = t.trim_start();
                    let name: String = t
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && t[name.len()..].trim_start().starts_with('(') {
                        names.push(name);
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    pub fn build() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let kdir = root.join("kernels");
        let shim = kdir.join("emu");
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("emu");
        std::fs::create_dir_all(&out).unwrap();
        for f in [
            "emu.h",
            "registry.h",
            "selftest.cpp",
            "cuda_fp16.h",
            "cuda_bf16.h",
        ] {
            println!("cargo:rerun-if-changed={}", shim.join(f).display());
        }
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++17")
            .opt_level(2)
            .debug(false)
            .warnings(false)
            .define("TOFFEE_EMU", None)
            .include(&shim)
            .include(&kdir)
            .flag("-include")
            .flag(shim.join("emu.h").to_str().unwrap());
        let compiler = build.get_compiler();
        let mut table = String::from(
            "/// (module, launch table) of every kernels/*.cu compiled for the software GPU.\n\
             pub const MODULES: &[(&str, unsafe extern \"C\" fn(*mut usize) -> *const EmuKernel)] = &[\n",
        );
        let mut decls = String::from("extern \"C\" {\n");
        for src in super::kernel_sources() {
            let name = src.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&src).unwrap();
            let unit = out.join(format!("{name}.cu.cpp"));
            std::fs::write(
                &unit,
                format!("#line 1 \"{}\"\n{}", src.display(), rewrite_shared(&text)),
            )
            .unwrap();
            let pre = Command::new(compiler.path())
                .args(["-std=c++17", "-E", "-DTOFFEE_EMU", "-x", "c++"])
                .arg("-I")
                .arg(&shim)
                .arg("-I")
                .arg(&kdir)
                .arg("-include")
                .arg(shim.join("emu.h"))
                .arg(&unit)
                .output()
                .expect("the C++ compiler runs");
            if !pre.status.success() {
                panic!(
                    "preprocessing kernels/{name}.cu for the software GPU failed:\n{}",
                    String::from_utf8_lossy(&pre.stderr)
                );
            }
            let kernels = kernel_names(&String::from_utf8_lossy(&pre.stdout));
            assert!(
                !kernels.is_empty(),
                "kernels/{name}.cu defines no extern \"C\" kernel"
            );
            let entries: String = kernels
                .iter()
                .map(|k| format!(" TOFFEE_EMU_KERNEL({k})"))
                .collect();
            let mut f = std::fs::read_to_string(&unit).unwrap();
            f.push_str(&format!("\nTOFFEE_EMU_MODULE({name},{entries})\n"));
            std::fs::write(&unit, f).unwrap();
            build.file(&unit);
            decls.push_str(&format!(
                "    fn toffee_emu_module_{name}(count: *mut usize) -> *const EmuKernel;\n"
            ));
            table.push_str(&format!("    ({name:?}, toffee_emu_module_{name}),\n"));
        }
        build.file(shim.join("selftest.cpp"));
        build.compile("toffee_emu");
        decls.push_str("}\n");
        table.push_str("];\n");
        std::fs::write(out.join("modules.rs"), decls + &table).unwrap();
    }
}

/// Writes `toffee.pc` next to the libraries (target/<profile>/), so C builds find the header
/// (include/) and libtoffee with `PKG_CONFIG_PATH=target/release pkg-config --cflags --libs toffee`.
fn pkg_config() {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out.
    let Some(libdir) = out.ancestors().nth(3) else {
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let pc = format!(
        "prefix={root}\nincludedir=${{prefix}}/include\nlibdir={}\n\nName: toffee\n\
         Description: Inference engine for Toffee-style subject-driven dataset construction (C ABI)\n\
         Version: {}\nCflags: -I${{includedir}}\nLibs: -L${{libdir}} -ltoffee\n\
         Libs.private: -lpthread -ldl -lm\n",
        libdir.display(),
        env!("CARGO_PKG_VERSION")
    );
    let _ = std::fs::write(libdir.join("toffee.pc"), pc);
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Architectures every module is built for; kernels needing sm_90a (wgmma/TMA) would go to a
    /// separate module so the rest still loads on sm_80.
    const GENCODE: &[&str] = &[
        "arch=compute_80,code=sm_80",
        "arch=compute_90,code=sm_90",
        "arch=compute_90,code=compute_90",
    ];
    const TARGETS: &[&str] = &["sm_80", "sm_90", "compute_90 (PTX)"];

    fn find_nvcc() -> PathBuf {
        println!("cargo:rerun-if-env-changed=NVCC");
        println!("cargo:rerun-if-env-changed=CUDA_HOME");
        if let Some(p) = std::env::var_os("NVCC") {
            return PathBuf::from(p);
        }
        if let Some(home) = std::env::var_os("CUDA_HOME") {
            let p = Path::new(&home).join("bin/nvcc");
            if p.is_file() {
                return p;
            }
        }
        let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".nvcc/nvidia/cu13/bin/nvcc");
        if local.is_file() {
            return local;
        }
        if Command::new("nvcc").arg("--version").output().is_ok() {
            return PathBuf::from("nvcc");
        }
        panic!(
            "the `cuda` feature needs nvcc, found neither $NVCC, $CUDA_HOME/bin/nvcc, .nvcc/ nor nvcc on PATH.\n\
             Install the pinned CUDA 13.0 compiler from PyPI wheels with `tools/install-nvcc.sh` (about 100 MB,\n\
             into .nvcc/, found automatically), or set NVCC=/path/to/nvcc."
        );
    }

    pub fn build() {
        let nvcc = find_nvcc();
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
        let kdir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let sources = super::kernel_sources();
        let mut modules = String::from("/// (module name, fatbin) for every kernels/*.cu file.\npub const MODULES: &[(&str, &[u8])] = &[\n");
        let jobs: Vec<_> = sources
            .iter()
            .map(|src| {
                let name = src.file_stem().unwrap().to_string_lossy().into_owned();
                let fatbin = out.join(format!("{name}.fatbin"));
                let mut cmd = Command::new(&nvcc);
                cmd.args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-warn-spills"]);
                for g in GENCODE {
                    cmd.args(["-gencode", g]);
                }
                cmd.arg("-I").arg(&kdir).arg("-o").arg(&fatbin).arg(src);
                let child = cmd
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
                (name, fatbin, child)
            })
            .collect();
        for (name, fatbin, child) in jobs {
            let o = child.wait_with_output().expect("nvcc runs");
            if !o.status.success() {
                panic!("nvcc failed on kernels/{name}.cu");
            }
            modules.push_str(&format!(
                "    ({name:?}, include_bytes!({:?})),\n",
                fatbin.display().to_string()
            ));
        }
        modules.push_str("];\n");
        modules.push_str(&format!(
            "/// GPU code embedded in every module.\npub const TARGETS: &[&str] = &{TARGETS:?};\n"
        ));
        std::fs::write(out.join("kernels.rs"), modules).unwrap();
    }
}
