//! The engine boundary as ONNX Runtime I/O bindings, the same on every ONNX Runtime backend,
//! made once per call and run many times: a stage's inputs and outputs are values over the
//! engine's own buffers (`values.rs`) — the host for `ort-cpu`, the GPU for `ort-cuda` — and the
//! KV cache is one buffer with a region per block: each block's past (a prefix of its region) is
//! bound as its `past_{i}` input and the scale's range of it as its `kv_new_{i}` output, so the
//! session reads the past and writes the scale's K/V in place. ort-cpu runs every generation
//! through this code, so the golden suites test the bookkeeping (offsets, views, in-place
//! writes) that ort-cuda uses over device memory.

use super::Place;
use crate::engine::{Call, PortBind};
use crate::error::{EngineError, Result};
use crate::values::ValueStore;
use star_artifact::dtype::Dtype;
use star_artifact::kv::KvLayout;
use star_artifact::stage::io;
use star_artifact::tensor::Tensor;
use std::collections::HashMap;

/// A status of ONNX Runtime's C API as a result: its message, the status released.
pub(crate) fn checked(s: ort::sys::OrtStatusPtr) -> std::result::Result<(), String> {
    if s.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status is a valid OrtStatus until released, here.
    unsafe {
        let m = std::ffi::CStr::from_ptr((api.GetErrorMessage)(s.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(s.0);
        Err(m)
    }
}

/// An ONNX Runtime tensor over `len` bytes at `data` in `place` (memory that outlives it). The
/// value is owned from ort's point of view, so binding it aliases the buffer instead of copying
/// it (ort clones borrowed values on every bind).
///
/// # Safety
/// `data..data+len` must stay valid for the value's lifetime and be aligned for the element
/// type; it is written only where the value is bound as an output.
pub unsafe fn value_over(
    data: *const u8,
    len: usize,
    shape: &[i64],
    elem: ort::sys::ONNXTensorElementDataType,
    place: Place,
) -> std::result::Result<ort::value::DynValue, String> {
    use ort::AsPointer;
    let info = place.memory_info()?;
    let api = ort::api();
    let mut v: *mut ort::sys::OrtValue = std::ptr::null_mut();
    // SAFETY: the caller guarantees the buffer.
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            info.ptr(),
            data as *mut std::ffi::c_void,
            len,
            shape.as_ptr(),
            shape.len(),
            elem,
            &mut v,
        )
    };
    checked(status)?;
    let v = std::ptr::NonNull::new(v).ok_or("CreateTensorWithDataAsOrtValue returned null")?;
    // SAFETY: a fresh tensor value we own; its data is not allocator-owned (ORT never frees it).
    Ok(unsafe { ort::value::Value::from_ptr(v, Some(&ort::memory::Allocator::default())) })
}

/// ONNX Runtime's element type of `d` (the dtypes of stage values and of the KV cache).
fn element(d: Dtype) -> std::result::Result<ort::sys::ONNXTensorElementDataType, String> {
    use ort::sys::ONNXTensorElementDataType as T;
    match d {
        Dtype::Float32 => Ok(T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
        Dtype::Float16 => Ok(T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
        Dtype::Int64 => Ok(T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64),
        d @ (Dtype::Bfloat16
        | Dtype::Float64
        | Dtype::Int32
        | Dtype::Int8
        | Dtype::Uint8
        | Dtype::Bool) => Err(format!("no stage value is {d}")),
    }
}

/// A value over one block's region of a cache buffer whose first byte is at `base`.
///
/// # Safety
/// `base` must point at a live buffer of `layout.bytes()` bytes in `place` that outlives the
/// value.
pub unsafe fn kv_value(
    base: *mut u8,
    layout: &KvLayout,
    block: usize,
    begin: usize,
    n: usize,
    place: Place,
) -> std::result::Result<ort::value::DynValue, String> {
    let r = layout.region(block, begin, n)?;
    let shape: Vec<i64> = r.shape.iter().map(|&d| d as i64).collect();
    // SAFETY: the region is inside the buffer (checked by `region`); the caller guarantees it.
    unsafe {
        value_over(
            base.add(r.byte_offset),
            r.bytes,
            &shape,
            element(layout.dtype)?,
            place,
        )
    }
}

/// A value over the first elements of a port's engine value.
fn port_value(
    values: &mut dyn ValueStore,
    p: &PortBind,
    place: Place,
) -> std::result::Result<ort::value::DynValue, String> {
    let base = values
        .address(p.slot)
        .ok_or_else(|| format!("engine value {:?} is not allocated", p.slot))?;
    let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
    // SAFETY: `ModelDir::run` reserved the value for at least this shape; the binding that
    // holds this value is dropped when the value store reallocates (its epoch, `BindCache`).
    unsafe { value_over(base, p.bytes(), &shape, element(p.dtype)?, place) }
}

/// The I/O binding of one call, made once and run many times (`BindCache`): every input and
/// output port a value over its engine value (the host for `ort-cpu`, the device for
/// `ort-cuda`), every block's past a view of the prefix of its cache region and its `kv_new_{i}`
/// a view of the scale's range of it, written in place. ort-cpu runs every generation through
/// this code, so the golden suites test the bookkeeping ort-cuda uses over device memory.
pub fn make_binding(
    session: &ort::session::Session,
    call: &Call,
    values: &mut dyn ValueStore,
    cache: Option<(*mut u8, KvLayout)>,
    place: Place,
) -> Result<ort::session::IoBinding> {
    let stage = call.stage;
    let bad = |input: &str, why: String| EngineError::BadInput {
        stage: stage.name().into(),
        input: input.into(),
        why,
    };
    let err = |e: ort::Error| EngineError::Ort {
        context: format!("binding stage {stage}"),
        message: e.to_string(),
    };
    let mut b = session.create_binding().map_err(err)?;
    for p in &call.inputs {
        let v = port_value(values, p, place).map_err(|why| bad(&p.name, why))?;
        b.bind_input(p.name.as_str(), &v).map_err(err)?;
    }
    for p in &call.outputs {
        let v =
            port_value(values, p, place).map_err(|why| bad(&p.name, format!("(output) {why}")))?;
        b.bind_output(p.name.as_str(), v).map_err(err)?;
    }
    let host = Place::Host
        .memory_info()
        .map_err(|m| err(ort::Error::new(m)))?;
    for name in &call.to_host {
        b.bind_output_to_device(name.as_str(), &host).map_err(err)?;
    }
    if let Some(kv) = call.kv {
        let (base, layout) = cache
            .ok_or_else(|| EngineError::Unsupported("KV cache used before kv_alloc".into()))?;
        // The past views and the new K/V ranges of one run must not overlap: a past of `len`
        // tokens ends at or before the range written at `begin`.
        if kv.past.is_some_and(|len| len > kv.write.begin) {
            return Err(bad(
                io::PAST,
                format!(
                    "a past of {:?} tokens overlaps the K/V written at {}",
                    kv.past, kv.write.begin
                ),
            ));
        }
        for i in 0..layout.depth() {
            if let Some(len) = kv.past {
                let n = io::past(i);
                // SAFETY: the engine's live cache (its epoch guards the binding); the past is a
                // prefix of the block's region (bounds checked).
                let v = unsafe { kv_value(base, &layout, i, 0, len, place) }
                    .map_err(|why| bad(&n, why))?;
                b.bind_input(n.as_str(), &v).map_err(err)?;
            }
            let n = io::kv_new(i);
            // SAFETY: as above. The range starts where the block's past ends: the two never
            // overlap, and a stage producing another shape is an error from ONNX Runtime, not
            // a stray write.
            let v = unsafe { kv_value(base, &layout, i, kv.write.begin, kv.write.tokens, place) }
                .map_err(|why| bad(&n, format!("(output) {why}")))?;
            b.bind_output(n.as_str(), v).map_err(err)?;
        }
    }
    Ok(b)
}

/// Run `session` on a binding made by `make_binding`: outputs are written into the values the
/// binding points at (an output of another shape than bound is ONNX Runtime's error); the
/// `to_host` ones are returned.
pub fn run_binding(
    session: &mut ort::session::Session,
    binding: &ort::session::IoBinding,
    label: &str,
    run_options: Option<&ort::session::RunOptions>,
    to_host: &[String],
) -> Result<HashMap<String, Tensor>> {
    let err = |e: ort::Error| EngineError::Ort {
        context: format!("running stage {label}"),
        message: e.to_string(),
    };
    let outputs = match run_options {
        Some(o) => session.run_binding_with_options(binding, o),
        None => session.run_binding(binding),
    }
    .map_err(err)?;
    let mut out = HashMap::new();
    for name in to_host {
        let v = outputs.get(name.as_str()).ok_or_else(|| EngineError::Ort {
            context: format!("running stage {label}"),
            message: format!("output {name} missing"),
        })?;
        let (shape, data) = v.try_extract_tensor::<f32>().map_err(err)?;
        let shape = shape.iter().map(|&d| d as usize).collect();
        out.insert(name.clone(), Tensor::f32(shape, data.to_vec()));
    }
    Ok(out)
}

/// Where ONNX Runtime placed a session's nodes: (execution provider, operator type, node name).
/// Needs the session option `session.record_ep_graph_assignment_info = 1` (PLACEMENT_CONFIG).
pub fn placement(
    session: &ort::session::Session,
) -> std::result::Result<Vec<(String, String, String)>, String> {
    use ort::AsPointer;
    let api = ort::api();
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: ONNX Runtime returns NUL-terminated strings owned by the session.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let mut out = vec![];
    let mut subs: *const *const ort::sys::OrtEpAssignedSubgraph = std::ptr::null();
    let mut n = 0usize;
    // SAFETY: a live session; the arrays are owned by it and read before it changes.
    unsafe {
        checked((api.Session_GetEpGraphAssignmentInfo)(
            session.ptr(),
            &mut subs,
            &mut n,
        ))?;
        for i in 0..n {
            let sub = *subs.add(i);
            let mut ep = std::ptr::null();
            checked((api.EpAssignedSubgraph_GetEpName)(sub, &mut ep))?;
            let ep = text(ep);
            let mut nodes: *const *const ort::sys::OrtEpAssignedNode = std::ptr::null();
            let mut nn = 0usize;
            checked((api.EpAssignedSubgraph_GetNodes)(sub, &mut nodes, &mut nn))?;
            for j in 0..nn {
                let node = *nodes.add(j);
                let (mut op, mut name) = (std::ptr::null(), std::ptr::null());
                checked((api.EpAssignedNode_GetOperatorType)(node, &mut op))?;
                checked((api.EpAssignedNode_GetName)(node, &mut name))?;
                out.push((ep.clone(), text(op), text(name)));
            }
        }
    }
    Ok(out)
}

/// The session option that makes ONNX Runtime record `placement`.
pub const PLACEMENT_CONFIG: &str = "session.record_ep_graph_assignment_info";

/// Operators that only compute shapes and indices: ONNX Runtime's GPU providers deliberately
/// leave these on the CPU (their inputs are shapes read on the host), which costs nothing.
const SHAPE_OPS: &[&str] = &[
    "Shape",
    "Size",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Slice",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Cast",
    "Range",
    "ConstantOfShape",
    "Reshape",
    "Expand",
    "Equal",
    "Where",
    "Min",
    "Max",
    "Identity",
    "Constant",
];

/// The nodes placed on the CPU that do real work (not shape arithmetic), as (operator type, node
/// name): a GPU backend refuses them unless --allow-cpu-fallback.
pub fn cpu_compute_nodes(placed: &[(String, String, String)]) -> Vec<(String, String)> {
    placed
        .iter()
        .filter(|(ep, op, _)| ep == "CPUExecutionProvider" && !SHAPE_OPS.contains(&op.as_str()))
        .map(|(_, op, name)| (op.clone(), name.clone()))
        .collect()
}

/// Every CPU node, grouped by operator type in first-seen order, on one line:
/// `Softmax x2 (attn.0.softmax, attn.1.softmax); Erf x1 (ffn.0.gelu)`.
pub fn describe_cpu_nodes(nodes: &[(String, String)]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = vec![];
    for (op, name) in nodes {
        match groups.iter_mut().find(|(o, _)| o == op) {
            Some((_, names)) => names.push(name),
            None => groups.push((op, vec![name])),
        }
    }
    groups
        .iter()
        .map(|(op, names)| format!("{op} x{} ({})", names.len(), names.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Registers an arena allocator for `place` in ONNX Runtime's environment
/// (CreateAndRegisterAllocatorV2, growing by what is requested), which every session created
/// with `session.use_env_allocators = 1` then shares instead of creating its own.
pub fn register_env_allocator(
    env: &ort::environment::Environment,
    place: Place,
) -> std::result::Result<(), String> {
    use ort::AsPointer;
    let api = ort::api();
    let info = place.memory_info()?;
    let (provider, device) = match place {
        Place::Host => (c"CPUExecutionProvider", 0),
        Place::Cuda(d) => (c"CUDAExecutionProvider", d),
    };
    let device = std::ffi::CString::new(device.to_string()).map_err(|e| e.to_string())?;
    let keys = [c"device_id".as_ptr()];
    let values = [device.as_ptr()];
    let mut cfg: *mut ort::sys::OrtArenaCfg = std::ptr::null_mut();
    let cfg_keys = [c"arena_extend_strategy".as_ptr()];
    // 1 = kSameAsRequested: the arena grows by what a run needs, not in doubling chunks.
    let cfg_values = [1usize];
    // SAFETY: the key and value arrays outlive the calls; the config is released after the
    // environment has built its allocator from it.
    unsafe {
        checked((api.CreateArenaCfgV2)(
            cfg_keys.as_ptr(),
            cfg_values.as_ptr(),
            1,
            &mut cfg,
        ))?;
        let r = checked((api.CreateAndRegisterAllocatorV2)(
            env.ptr() as *mut _,
            provider.as_ptr(),
            info.ptr(),
            cfg,
            keys.as_ptr(),
            values.as_ptr(),
            keys.len(),
        ));
        (api.ReleaseArenaCfg)(cfg);
        r
    }
}

#[cfg(test)]
mod placement_tests {
    use super::*;

    #[test]
    fn shape_arithmetic_on_the_cpu_is_not_a_fallback() {
        let p = |ep: &str, op: &str, n: &str| (ep.to_string(), op.to_string(), n.to_string());
        let placed = vec![
            p("CUDAExecutionProvider", "MatMul", "mm"),
            p("CPUExecutionProvider", "Shape", "shape_1"),
            p("CPUExecutionProvider", "Add", "add_3"),
            p("CPUExecutionProvider", "Softmax", "softmax_7"),
        ];
        let cpu = cpu_compute_nodes(&placed);
        assert_eq!(cpu, vec![("Softmax".to_string(), "softmax_7".to_string())]);
        let more = [
            cpu[0].clone(),
            ("Erf".to_string(), "gelu_1".to_string()),
            ("Softmax".to_string(), "softmax_9".to_string()),
        ];
        assert_eq!(
            describe_cpu_nodes(&more),
            "Softmax x2 (softmax_7, softmax_9); Erf x1 (gelu_1)"
        );
    }
}
