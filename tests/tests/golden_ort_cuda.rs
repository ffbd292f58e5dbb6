//! The golden suite on ort-cuda at every precision: compiled in CI, run where a GPU is (each
//! test says it was skipped elsewhere). Needs the GPU build of ONNX Runtime
//! (`scripts/setup-ort.sh --gpu`, or the bundle's libraries through ORT_GPU_DYLIB_PATH).

star_tests::golden_suite! {
    fp32: "ort-cuda", Fp32;
    fp16: "ort-cuda", Fp16;
    int8: "ort-cuda", Int8;
}
