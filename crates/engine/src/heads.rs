//! BGE-M3's extra heads: `sparse_linear` (lexical weights) and `colbert_linear`
//! (multi-vector), two `torch.nn.Linear` layers BAAI publishes beside the model,
//! applied here to llama.cpp's per-token hidden states.
//!
//! They come as PyTorch `.pt` files (a zip archive holding a pickle and raw
//! storages) or as `.safetensors`. Safetensors is read with Hugging Face's crate.
//! For `.pt` no small, maintained crate reads torch's pickle: `serde-pickle`
//! rejects persistent ids and torch's rebuild calls, and `candle-core` would bring
//! a whole tensor library for two matrices. So the pickle is interpreted here,
//! restricted to what `torch.save(state_dict)` writes; anything else is an error
//! naming the opcode or global, never a guess.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// `y = W x + b` with PyTorch's `[out, in]` weight layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub n_in: usize,
    pub n_out: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Linear {
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        debug_assert_eq!(x.len(), self.n_in);
        self.weight
            .chunks_exact(self.n_in)
            .zip(&self.bias)
            .map(|(row, b)| row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>() + b)
            .collect()
    }

    /// Reads the `weight` and `bias` tensors of a saved `Linear` (`.pt` or `.safetensors`).
    pub fn load(path: &Path) -> Result<Self, String> {
        let is_safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut tensors = if is_safetensors {
            read_safetensors(&bytes)
        } else {
            read_torch(&bytes)
        }
        .map_err(|e| format!("{}: {e}", path.display()))?;
        let (weight, w_shape) = tensors
            .remove("weight")
            .ok_or_else(|| format!("{}: no 'weight' tensor", path.display()))?;
        let (bias, b_shape) = tensors
            .remove("bias")
            .ok_or_else(|| format!("{}: no 'bias' tensor", path.display()))?;
        let [n_out, n_in] = w_shape[..] else {
            return Err(format!(
                "{}: 'weight' has shape {w_shape:?}, expected [out, in]",
                path.display()
            ));
        };
        if b_shape != [n_out] {
            return Err(format!(
                "{}: 'bias' has shape {b_shape:?}, expected [{n_out}]",
                path.display()
            ));
        }
        Ok(Self {
            n_in,
            n_out,
            weight,
            bias,
        })
    }
}

/// The heads found for one model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct M3Heads {
    pub sparse: Option<Linear>,
    pub colbert: Option<Linear>,
}

impl M3Heads {
    /// Looks beside the GGUF for `<stem>.sparse_linear.*` / `<stem>.colbert_linear.*`
    /// (several models in one folder) and then for BAAI's plain names
    /// `sparse_linear.*` / `colbert_linear.*`; safetensors before `.pt`.
    /// `Ok(None)` when there are none. Heads whose input width is not the
    /// model's hidden size are an error, not silently wrong numbers.
    pub fn find(gguf: &Path, n_embd: usize) -> Result<Option<Self>, String> {
        let dir = gguf.parent().unwrap_or(Path::new("."));
        let stem = gguf.file_stem().unwrap_or_default().to_string_lossy();
        let locate = |head: &str| -> Option<PathBuf> {
            [format!("{stem}.{head}"), head.to_owned()]
                .iter()
                .flat_map(|base| ["safetensors", "pt"].map(|ext| dir.join(format!("{base}.{ext}"))))
                .find(|p| p.is_file())
        };
        let load = |head: &str, n_out: Option<usize>| -> Result<Option<Linear>, String> {
            let Some(path) = locate(head) else {
                return Ok(None);
            };
            let linear = Linear::load(&path)?;
            if linear.n_in != n_embd || n_out.is_some_and(|n| n != linear.n_out) {
                return Err(format!(
                    "{}: head maps {} -> {}, but the model's hidden size is {n_embd}",
                    path.display(),
                    linear.n_in,
                    linear.n_out
                ));
            }
            Ok(Some(linear))
        };
        let heads = Self {
            sparse: load("sparse_linear", Some(1))?,
            colbert: load("colbert_linear", None)?,
        };
        Ok((heads.sparse.is_some() || heads.colbert.is_some()).then_some(heads))
    }
}

type Tensors = HashMap<String, (Vec<f32>, Vec<usize>)>;

fn read_safetensors(bytes: &[u8]) -> Result<Tensors, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => return Err(format!("tensor '{name}' has unsupported dtype {other:?}")),
            };
            let shape = view.shape().to_vec();
            let numel = shape.iter().product::<usize>();
            let values = dtype.decode(view.data(), 0, numel)?;
            Ok((name, (values, shape)))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// `numel` little-endian values starting `offset` elements into `bytes`.
    fn decode(self, bytes: &[u8], offset: usize, numel: usize) -> Result<Vec<f32>, String> {
        let size = self.size();
        let start = offset * size;
        let end = start + numel * size;
        let data = bytes
            .get(start..end)
            .ok_or_else(|| format!("tensor data is {} bytes, {end} needed", bytes.len()))?;
        Ok(data
            .chunks_exact(size)
            .map(|c| match self {
                DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            })
            .collect())
    }

    fn from_storage(name: &str) -> Result<Self, String> {
        match name {
            "FloatStorage" => Ok(DType::F32),
            "HalfStorage" => Ok(DType::F16),
            "BFloat16Storage" => Ok(DType::BF16),
            other => Err(format!("unsupported storage type torch.{other}")),
        }
    }
}

/// A torch zip archive: `<prefix>/data.pkl` plus one `<prefix>/data/<key>` per storage.
fn read_torch(bytes: &[u8]) -> Result<Tensors, String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a PyTorch zip archive: {e}"))?;
    let pkl_name = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .ok_or("no data.pkl in the archive")?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let mut read_member = |name: &str| -> Result<Vec<u8>, String> {
        let mut file = archive
            .by_name(name)
            .map_err(|e| format!("archive member {name}: {e}"))?;
        let mut out = Vec::with_capacity(file.size() as usize);
        file.read_to_end(&mut out)
            .map_err(|e| format!("archive member {name}: {e}"))?;
        Ok(out)
    };
    let pickle = read_member(&pkl_name)?;
    let Value::Dict(entries) = unpickle(&pickle)? else {
        return Err("the pickle is not a state dict".to_owned());
    };
    let mut tensors = Tensors::new();
    for (key, value) in entries {
        let (Value::Str(name), Value::Tensor(t)) = (key, value) else {
            return Err("the state dict holds something other than named tensors".to_owned());
        };
        let numel = t.shape.iter().product::<usize>();
        if !is_contiguous(&t.shape, &t.stride) {
            return Err(format!("tensor '{name}' is not contiguous"));
        }
        let data = read_member(&format!("{prefix}data/{}", t.storage.key))?;
        let values = t.storage.dtype.decode(&data, t.offset, numel)?;
        tensors.insert(name, (values, t.shape));
    }
    Ok(tensors)
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&dim, &s) in shape.iter().zip(stride).rev() {
        if dim > 1 && s != expected {
            return false;
        }
        expected *= dim;
    }
    shape.len() == stride.len()
}

#[derive(Debug, Clone)]
struct Storage {
    dtype: DType,
    key: String,
}

#[derive(Debug, Clone)]
struct Tensor {
    storage: Storage,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage(Storage),
    Tensor(Tensor),
    Mark,
}

impl Value {
    fn int(&self) -> Result<usize, String> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!("expected a non-negative integer, found {other:?}")),
        }
    }

    fn ints(&self) -> Result<Vec<usize>, String> {
        match self {
            Value::Tuple(items) | Value::List(items) => items.iter().map(Value::int).collect(),
            other => Err(format!("expected a tuple of integers, found {other:?}")),
        }
    }
}

/// Runs the subset of the pickle machine that `torch.save` uses for a state dict.
#[allow(clippy::too_many_lines)] // split in the next commit
fn unpickle(data: &[u8]) -> Result<Value, String> {
    let mut pos = 0;
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let take = |n: usize, pos: &mut usize| -> Result<&[u8], String> {
        let bytes = data
            .get(*pos..*pos + n)
            .ok_or("the pickle ends early".to_owned())?;
        *pos += n;
        Ok(bytes)
    };
    fn pop(stack: &mut Vec<Value>) -> Result<Value, String> {
        stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_owned())
    }
    fn pop_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>, String> {
        let mark = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("pickle MARK missing")?;
        let items = stack.split_off(mark + 1);
        stack.pop();
        Ok(items)
    }
    fn line(data: &[u8], pos: &mut usize) -> Result<String, String> {
        let end = data[*pos..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated pickle line")?;
        let s = String::from_utf8_lossy(&data[*pos..*pos + end]).into_owned();
        *pos += end + 1;
        Ok(s)
    }
    loop {
        let op = take(1, &mut pos)?[0];
        match op {
            0x80 => {
                take(1, &mut pos)?; // PROTO
            }
            0x95 => {
                take(8, &mut pos)?; // FRAME
            }
            b'c' => {
                let module = line(data, &mut pos)?;
                let name = line(data, &mut pos)?;
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return Err("STACK_GLOBAL without names".to_owned()),
                }
            }
            b'q' => {
                let idx = take(1, &mut pos)?[0] as u32;
                memo.insert(idx, stack.last().cloned().ok_or("BINPUT on empty stack")?);
            }
            b'r' => {
                let b = take(4, &mut pos)?;
                let idx = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                memo.insert(
                    idx,
                    stack.last().cloned().ok_or("LONG_BINPUT on empty stack")?,
                );
            }
            0x94 => {
                let idx = memo.len() as u32; // MEMOIZE
                memo.insert(idx, stack.last().cloned().ok_or("MEMOIZE on empty stack")?);
            }
            b'h' => {
                let idx = take(1, &mut pos)?[0] as u32;
                stack.push(memo.get(&idx).cloned().ok_or("BINGET of unknown memo")?);
            }
            b'j' => {
                let b = take(4, &mut pos)?;
                let idx = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                stack.push(
                    memo.get(&idx)
                        .cloned()
                        .ok_or("LONG_BINGET of unknown memo")?,
                );
            }
            b'(' => stack.push(Value::Mark),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 | 0x89 => stack.push(Value::Bool),
            b'K' => stack.push(Value::Int(i64::from(take(1, &mut pos)?[0]))),
            b'M' => {
                let b = take(2, &mut pos)?;
                stack.push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
            }
            b'J' => {
                let b = take(4, &mut pos)?;
                stack.push(Value::Int(i64::from(i32::from_le_bytes([
                    b[0], b[1], b[2], b[3],
                ]))));
            }
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = take(1, &mut pos)?[0] as usize;
                let b = take(n, &mut pos)?;
                if n > 8 {
                    return Err("integer too large in pickle".to_owned());
                }
                let mut buf = [if b.last().is_some_and(|x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                }; 8];
                buf[..n].copy_from_slice(b);
                stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                take(8, &mut pos)?; // BINFLOAT: no state dict field needs its value
                stack.push(Value::Float);
            }
            b'X' => {
                let b = take(4, &mut pos)?;
                let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let s = take(n, &mut pos)?;
                stack.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
            }
            0x8c => {
                let n = take(1, &mut pos)?[0] as usize;
                let s = take(n, &mut pos)?;
                stack.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("pickle stack underflow".to_owned());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'a' => {
                let item = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(list)) => list.push(item),
                    _ => return Err("APPEND to a non-list".to_owned()),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(list)) => list.extend(items),
                    _ => return Err("APPENDS to a non-list".to_owned()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                let Some(Value::Dict(dict)) = stack.last_mut() else {
                    return Err("SETITEMS on a non-dict".to_owned());
                };
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    dict.push((k, v));
                }
            }
            b'Q' => {
                // BINPERSID: ('storage', StorageType, key, location, numel)
                let Value::Tuple(pid) = pop(&mut stack)? else {
                    return Err("persistent id is not a tuple".to_owned());
                };
                let (Some(Value::Global(_, storage_type)), Some(key)) = (pid.get(1), pid.get(2))
                else {
                    return Err(format!("unsupported persistent id {pid:?}"));
                };
                let key = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    other => return Err(format!("unsupported storage key {other:?}")),
                };
                stack.push(Value::Storage(Storage {
                    dtype: DType::from_storage(storage_type)?,
                    key,
                }));
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let Value::Global(module, name) = pop(&mut stack)? else {
                    return Err("REDUCE of something not callable".to_owned());
                };
                let Value::Tuple(args) = args else {
                    return Err("REDUCE arguments are not a tuple".to_owned());
                };
                stack.push(call(&module, &name, args)?);
            }
            b'b' => {
                // BUILD: an OrderedDict's state (torch's `_metadata`): not needed.
                pop(&mut stack)?;
            }
            b'.' => return pop(&mut stack),
            other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
        }
    }
}

/// The few callables a state dict's pickle invokes.
fn call(module: &str, name: &str, args: Vec<Value>) -> Result<Value, String> {
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") => {
            let mut args = args.into_iter();
            let (Some(Value::Storage(storage)), Some(offset), Some(shape), Some(stride)) =
                (args.next(), args.next(), args.next(), args.next())
            else {
                return Err("malformed _rebuild_tensor_v2 call".to_owned());
            };
            Ok(Value::Tensor(Tensor {
                storage,
                offset: offset.int()?,
                shape: shape.ints()?,
                stride: stride.ints()?,
            }))
        }
        ("torch._utils", "_rebuild_parameter") => match args.into_iter().next() {
            Some(tensor @ Value::Tensor(_)) => Ok(tensor),
            _ => Err("malformed _rebuild_parameter call".to_owned()),
        },
        _ => Err(format!("unsupported pickle global {module}.{name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads_dir() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/models/m3-heads"
        ))
    }

    #[test]
    fn torch_and_safetensors_files_hold_the_same_heads() {
        let dir = heads_dir();
        for head in ["sparse_linear", "colbert_linear"] {
            let pt = Linear::load(&dir.join(format!("{head}.pt"))).unwrap();
            let st = Linear::load(&dir.join(format!("{head}.safetensors"))).unwrap();
            assert_eq!(pt, st, "{head}");
            assert_eq!(pt.n_in, 384);
            // The f16 copies agree to f16 precision.
            for ext in ["pt", "safetensors"] {
                let half = Linear::load(&dir.join(format!("fp16/{head}.{ext}"))).unwrap();
                assert_eq!((half.n_in, half.n_out), (pt.n_in, pt.n_out));
                let max_diff = half
                    .weight
                    .iter()
                    .zip(&pt.weight)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(max_diff < 1e-4, "{head}.{ext}: {max_diff}");
            }
        }
        let colbert = Linear::load(&dir.join("colbert_linear.pt")).unwrap();
        assert_eq!(colbert.n_out, 384);
        let sparse = Linear::load(&dir.join("sparse_linear.pt")).unwrap();
        assert_eq!(sparse.n_out, 1);
        // PyTorch's default init bounds every value by 1/sqrt(384).
        assert!(colbert.weight.iter().all(|w| w.abs() <= 0.0511));
        assert!(colbert.weight.iter().any(|w| w.abs() > 0.04));
    }

    #[test]
    fn apply_is_weight_times_x_plus_bias() {
        let linear = Linear {
            n_in: 2,
            n_out: 2,
            weight: vec![1.0, 2.0, 3.0, 4.0],
            bias: vec![0.5, -1.0],
        };
        assert_eq!(linear.apply(&[1.0, 1.0]), vec![3.5, 6.0]);
    }

    #[test]
    fn broken_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let original = std::fs::read(heads_dir().join("sparse_linear.pt")).unwrap();
        for cut in [0, 10, 100, original.len() / 2, original.len() - 30] {
            let path = dir.path().join("sparse_linear.pt");
            std::fs::write(&path, &original[..cut]).unwrap();
            assert!(Linear::load(&path).is_err(), "cut at {cut}");
        }
        let path = dir.path().join("x.safetensors");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
        assert!(Linear::load(&path).is_err());
        // Truncated pickles never read out of bounds.
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&original)).unwrap();
        let name = archive
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .find(|n| n.ends_with("data.pkl"))
            .unwrap();
        let mut pkl = Vec::new();
        archive
            .by_name(&name)
            .unwrap()
            .read_to_end(&mut pkl)
            .unwrap();
        for cut in 0..pkl.len() {
            assert!(unpickle(&pkl[..cut]).is_err());
        }
    }

    #[test]
    fn heads_are_found_beside_the_model_and_checked_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m3.gguf");
        std::fs::write(&gguf, b"").unwrap();
        assert_eq!(M3Heads::find(&gguf, 384).unwrap(), None);
        std::fs::copy(
            heads_dir().join("sparse_linear.pt"),
            dir.path().join("m3.sparse_linear.pt"),
        )
        .unwrap();
        let found = M3Heads::find(&gguf, 384).unwrap().unwrap();
        assert!(found.sparse.is_some() && found.colbert.is_none());
        std::fs::copy(
            heads_dir().join("colbert_linear.safetensors"),
            dir.path().join("colbert_linear.safetensors"),
        )
        .unwrap();
        let found = M3Heads::find(&gguf, 384).unwrap().unwrap();
        assert!(found.sparse.is_some() && found.colbert.is_some());
        let err = M3Heads::find(&gguf, 1024).unwrap_err();
        assert!(err.contains("hidden size is 1024"), "{err}");
    }
}
