//! The golden suite on ort-cpu at every precision (run in CI).

star_tests::golden_suite! {
    fp32: "ort-cpu", Fp32;
    fp16: "ort-cpu", Fp16;
    int8: "ort-cpu", Int8;
}
