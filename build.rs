// The CUDA kernels are compiled here once the `cuda` feature exists in earnest (CUDA backend issue).
// Without the feature the build needs no CUDA toolkit at all.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
