//! With the `cuda` feature, compiles kernels/*.cu with nvcc into fatbins (SASS for sm_80 and sm_90,
//! PTX for compute_90) that the binary embeds. Without it, does nothing: the default build needs no
//! CUDA toolkit at all.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    pkg_config();
    #[cfg(feature = "cuda")]
    cuda::build();
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
        println!("cargo:rerun-if-changed={}", kdir.display());
        let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
            .expect("kernels/ exists")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
            .collect();
        sources.sort();
        let mut modules = String::from("/// (module name, fatbin) for every kernels/*.cu file.\npub const MODULES: &[(&str, &[u8])] = &[\n");
        let jobs: Vec<_> = sources
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "cu"))
            .map(|src| {
                println!("cargo:rerun-if-changed={}", src.display());
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
