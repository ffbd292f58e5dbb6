//! A restricted unpickler for PyTorch checkpoints. It understands the pickle opcodes that
//! `torch.save` emits and rebuilds only tensors, (Ordered)dicts, lists, tuples and primitives.
//! Nothing is ever executed: a GLOBAL outside the small allow-list is an error that names it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

#[derive(Clone, Debug)]
pub struct StorageRef {
    pub key: String,
    /// torch storage type name, e.g. "FloatStorage".
    pub kind: String,
}

#[derive(Clone, Debug)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Rc<RefCell<Vec<Value>>>),
    Tuple(Rc<Vec<Value>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(String),
    Storage(StorageRef),
    Tensor(Rc<TensorRef>),
    Mark,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn dict_get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Mark => "mark",
        }
    }
}

const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
];

#[derive(Debug)]
pub enum PickleError {
    Foreign(String),
    Malformed(String),
}

type R<T> = std::result::Result<T, PickleError>;

fn bad<T>(why: impl Into<String>) -> R<T> {
    Err(PickleError::Malformed(why.into()))
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if self.pos + n > self.b.len() {
            return bad(format!("unexpected end of data at byte {}", self.pos));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> R<String> {
        let start = self.pos;
        while self.pos < self.b.len() && self.b[self.pos] != b'\n' {
            self.pos += 1;
        }
        if self.pos >= self.b.len() {
            return bad("unterminated line");
        }
        let s = String::from_utf8_lossy(&self.b[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }
}

fn to_usize_vec(v: &Value) -> R<Vec<usize>> {
    let items: Vec<Value> = match v {
        Value::Tuple(t) => t.as_ref().clone(),
        Value::List(l) => l.borrow().clone(),
        _ => return bad(format!("expected a tuple of ints, got {}", v.kind())),
    };
    items
        .iter()
        .map(|x| match x {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            _ => bad("expected a non-negative int in a size/stride tuple"),
        })
        .collect()
}

fn reduce(func: &Value, args: Value) -> R<Value> {
    let Value::Global(name) = func else {
        return bad(format!("REDUCE on a {}", func.kind()));
    };
    let args: Vec<Value> = match args {
        Value::Tuple(t) => t.as_ref().clone(),
        _ => return bad("REDUCE arguments are not a tuple"),
    };
    match name.as_str() {
        "collections.OrderedDict" => Ok(Value::Dict(Rc::new(RefCell::new(vec![])))),
        "torch._utils._rebuild_tensor_v2" => {
            if args.len() < 4 {
                return bad("_rebuild_tensor_v2 with fewer than 4 arguments");
            }
            let Value::Storage(storage) = &args[0] else {
                return bad("_rebuild_tensor_v2 without a storage");
            };
            let Value::Int(offset) = args[1] else {
                return bad("_rebuild_tensor_v2: bad offset");
            };
            let shape = to_usize_vec(&args[2])?;
            let stride = to_usize_vec(&args[3])?;
            if shape.len() != stride.len() {
                return bad("_rebuild_tensor_v2: size and stride differ in length");
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: storage.clone(),
                offset: offset.max(0) as usize,
                shape,
                stride,
            })))
        }
        "torch._utils._rebuild_parameter" => args
            .into_iter()
            .next()
            .ok_or(PickleError::Malformed("empty _rebuild_parameter".into())),
        other => Err(PickleError::Foreign(other.to_string())),
    }
}

/// Unpickle `data`. `persistent` turns a persistent id tuple into a value (torch storages).
pub fn load(data: &[u8]) -> R<Value> {
    let mut r = Reader { b: data, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let pop = |stack: &mut Vec<Value>| {
        stack
            .pop()
            .ok_or(PickleError::Malformed("stack underflow".into()))
    };
    let pop_mark = |stack: &mut Vec<Value>| -> R<Vec<Value>> {
        let pos = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or(PickleError::Malformed("no MARK".into()))?;
        let items = stack.split_off(pos + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?;
            } // PROTO
            0x95 => {
                r.take(8)?;
            } // FRAME
            b'.' => return pop(&mut stack),
            b'(' => stack.push(Value::Mark),
            b'}' => stack.push(Value::Dict(Rc::new(RefCell::new(vec![])))),
            b']' => stack.push(Value::List(Rc::new(RefCell::new(vec![])))),
            b')' => stack.push(Value::Tuple(Rc::new(vec![]))),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return bad("stack underflow in TUPLEn");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(Rc::new(items)));
            }
            b'q' => {
                let k = r.u8()? as u32;
                memo.insert(
                    k,
                    stack
                        .last()
                        .cloned()
                        .ok_or(PickleError::Malformed("BINPUT on empty stack".into()))?,
                );
            }
            b'r' => {
                let k = r.u32()?;
                memo.insert(
                    k,
                    stack
                        .last()
                        .cloned()
                        .ok_or(PickleError::Malformed("LONG_BINPUT on empty stack".into()))?,
                );
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(
                    k,
                    stack
                        .last()
                        .cloned()
                        .ok_or(PickleError::Malformed("MEMOIZE on empty stack".into()))?,
                );
            }
            b'h' => {
                let k = r.u8()? as u32;
                stack.push(
                    memo.get(&k)
                        .cloned()
                        .ok_or(PickleError::Malformed(format!("BINGET {k} unknown")))?,
                );
            }
            b'j' => {
                let k = r.u32()?;
                stack.push(
                    memo.get(&k)
                        .cloned()
                        .ok_or(PickleError::Malformed(format!("LONG_BINGET {k} unknown")))?,
                );
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            0x8d => {
                let n = u64::from_le_bytes(r.take(8)?.try_into().unwrap()) as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            b'T' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'J' => stack.push(Value::Int(
                i32::from_le_bytes(r.take(4)?.try_into().unwrap()) as i64,
            )),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(
                u16::from_le_bytes(r.take(2)?.try_into().unwrap()) as i64,
            )),
            0x8a => {
                let n = r.u8()? as usize;
                let bytes = r.take(n)?;
                if n > 8 {
                    return bad("LONG1 wider than 64 bits");
                }
                let mut v: i64 = 0;
                for (i, &b) in bytes.iter().enumerate() {
                    v |= (b as i64) << (8 * i);
                }
                if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(
                r.take(8)?.try_into().unwrap(),
            ))),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'N' => stack.push(Value::None),
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                let full = format!("{module}.{name}");
                if !ALLOWED.contains(&full.as_str()) {
                    return Err(PickleError::Foreign(full));
                }
                stack.push(Value::Global(full));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                let full = format!(
                    "{}.{}",
                    module.as_str().unwrap_or("?"),
                    name.as_str().unwrap_or("?")
                );
                if !ALLOWED.contains(&full.as_str()) {
                    return Err(PickleError::Foreign(full));
                }
                stack.push(Value::Global(full));
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(reduce(&func, args)?);
            }
            0x81 => {
                // NEWOBJ: cls.__new__(cls, *args); only OrderedDict is allowed to reach here.
                let args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                stack.push(reduce(&cls, args)?);
            }
            b'b' => {
                // BUILD: state for OrderedDict (_metadata) or tensors (hooks); nothing we need.
                pop(&mut stack)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                let Value::Tuple(t) = pid else {
                    return bad("persistent id is not a tuple");
                };
                if t.len() < 3 || t[0].as_str() != Some("storage") {
                    return bad("persistent id is not a torch storage");
                }
                let Value::Global(kind) = &t[1] else {
                    return bad("storage type is not a class");
                };
                let key = match &t[2] {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => return bad("storage key"),
                };
                stack.push(Value::Storage(StorageRef {
                    key,
                    kind: kind.trim_start_matches("torch.").to_string(),
                }));
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last() {
                    Some(Value::Dict(d)) => d.borrow_mut().push((k, v)),
                    _ => return bad("SETITEM on a non-dict"),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                match stack.last() {
                    Some(Value::Dict(d)) => {
                        let mut d = d.borrow_mut();
                        for pair in items.chunks(2) {
                            if pair.len() == 2 {
                                d.push((pair[0].clone(), pair[1].clone()));
                            }
                        }
                    }
                    _ => return bad("SETITEMS on a non-dict"),
                }
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().push(v),
                    _ => return bad("APPEND on a non-list"),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().extend(items),
                    _ => return bad("APPENDS on a non-list"),
                }
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'2' => {
                let v = stack
                    .last()
                    .cloned()
                    .ok_or(PickleError::Malformed("DUP on empty stack".into()))?;
                stack.push(v);
            }
            other => {
                return bad(format!(
                    "unsupported opcode 0x{other:02x} at byte {}",
                    r.pos - 1
                ))
            }
        }
    }
}
