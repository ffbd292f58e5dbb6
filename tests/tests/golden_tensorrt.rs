//! The golden suite on native TensorRT (engines built by `build-engine`) at every precision:
//! compiled in CI with the `tensorrt` feature, run where a GPU and TensorRT 11.4+ are.
#![cfg(feature = "tensorrt")]

star_tests::golden_suite! {
    fp32: "tensorrt", Fp32;
    fp16: "tensorrt", Fp16;
    int8: "tensorrt", Int8;
}
