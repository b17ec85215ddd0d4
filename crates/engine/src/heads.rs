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

/// Why a head file could not be used. The messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FormatError },
    #[error("{}: no '{name}' tensor", path.display())]
    MissingTensor { path: PathBuf, name: &'static str },
    #[error("{}: 'weight' has shape {shape:?}, expected [out, in]", path.display())]
    WeightShape { path: PathBuf, shape: Vec<usize> },
    #[error("{}: 'bias' has shape {shape:?}, expected [{n_out}]", path.display())]
    BiasShape {
        path: PathBuf,
        shape: Vec<usize>,
        n_out: usize,
    },
    /// The head does not fit the model: a wrong input width, or a sparse head
    /// with more than one output.
    #[error(
        "{}: head maps {n_in} -> {n_out}, but the model's hidden size is {n_embd}",
        path.display()
    )]
    Mismatch {
        path: PathBuf,
        n_in: usize,
        n_out: usize,
        n_embd: usize,
    },
}

/// What is wrong inside a safetensors file or a torch archive.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("tensor '{name}' has unsupported dtype {dtype:?}")]
    UnsupportedDtype {
        name: String,
        dtype: safetensors::Dtype,
    },
    #[error("tensor data is {len} bytes, {needed} needed")]
    ShortData { len: usize, needed: usize },
    #[error("tensor shape {0:?} has more elements than memory can address")]
    TooLarge(Vec<usize>),
    #[error("tensor '{0}' is not contiguous")]
    NotContiguous(String),
    #[error("not a PyTorch zip archive: {0}")]
    NotZip(zip::result::ZipError),
    #[error("no data.pkl in the archive")]
    NoPickle,
    #[error("archive member {name}: {source}")]
    Member {
        name: String,
        source: zip::result::ZipError,
    },
    #[error("archive member {name}: {source}")]
    MemberRead {
        name: String,
        source: std::io::Error,
    },
    #[error("the pickle is not a state dict")]
    NotStateDict,
    #[error("the state dict holds something other than named tensors")]
    NotNamedTensors,
    #[error(transparent)]
    Pickle(#[from] PickleError),
}

/// A pickle that is not what `torch.save(state_dict)` writes.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("the pickle ends early")]
    Truncated,
    #[error("pickle stack underflow")]
    StackUnderflow,
    #[error("pickle MARK missing")]
    MarkMissing,
    #[error("unterminated pickle line")]
    UnterminatedLine,
    /// A memo write (`BINPUT`, `LONG_BINPUT`, `MEMOIZE`) with nothing to store.
    #[error("{op} on empty stack")]
    MemoOfNothing { op: &'static str },
    /// A memo read (`BINGET`, `LONG_BINGET`) of an index never stored.
    #[error("{op} of unknown memo")]
    UnknownMemo { op: &'static str },
    #[error("integer too large in pickle")]
    IntegerTooLarge,
    /// An opcode applied to operands of the wrong kind; says which.
    #[error("{0}")]
    Malformed(&'static str),
    #[error("unsupported persistent id {0}")]
    UnsupportedPersistentId(String),
    #[error("unsupported storage key {0}")]
    UnsupportedStorageKey(String),
    #[error("unsupported storage type torch.{0}")]
    UnsupportedStorage(String),
    #[error("unsupported pickle opcode 0x{0:02x}")]
    UnsupportedOpcode(u8),
    #[error("unsupported pickle global {module}.{name}")]
    UnsupportedGlobal { module: String, name: String },
    #[error("expected a non-negative integer, found {0}")]
    ExpectedInt(String),
    #[error("expected a tuple of integers, found {0}")]
    ExpectedInts(String),
}

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
    pub fn load(path: &Path) -> Result<Self, HeadError> {
        let is_safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        let bytes = std::fs::read(path).map_err(|source| HeadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes, is_safetensors, path)
    }

    /// Reads a saved `Linear` from the bytes of a `.safetensors` or `.pt` file;
    /// `path` only names it in errors.
    pub fn from_bytes(bytes: &[u8], is_safetensors: bool, path: &Path) -> Result<Self, HeadError> {
        let mut tensors = if is_safetensors {
            read_safetensors(bytes)
        } else {
            read_torch(bytes)
        }
        .map_err(|source| HeadError::Format {
            path: path.to_owned(),
            source,
        })?;
        let mut tensor = |name: &'static str| {
            tensors
                .remove(name)
                .ok_or_else(|| HeadError::MissingTensor {
                    path: path.to_owned(),
                    name,
                })
        };
        let (weight, w_shape) = tensor("weight")?;
        let (bias, b_shape) = tensor("bias")?;
        let [n_out, n_in] = w_shape[..] else {
            return Err(HeadError::WeightShape {
                path: path.to_owned(),
                shape: w_shape,
            });
        };
        // A head maps at least one input (`apply` reads rows of `n_in`).
        if n_in == 0 || n_out == 0 {
            return Err(HeadError::WeightShape {
                path: path.to_owned(),
                shape: w_shape,
            });
        }
        if b_shape != [n_out] {
            return Err(HeadError::BiasShape {
                path: path.to_owned(),
                shape: b_shape,
                n_out,
            });
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
    pub fn find(gguf: &Path, n_embd: usize) -> Result<Option<Self>, HeadError> {
        let dir = gguf.parent().unwrap_or(Path::new("."));
        let stem = gguf.file_stem().unwrap_or_default().to_string_lossy();
        let locate = |head: &str| -> Option<PathBuf> {
            [format!("{stem}.{head}"), head.to_owned()]
                .iter()
                .flat_map(|base| ["safetensors", "pt"].map(|ext| dir.join(format!("{base}.{ext}"))))
                .find(|p| p.is_file())
        };
        let load = |head: &str, n_out: Option<usize>| -> Result<Option<Linear>, HeadError> {
            let Some(path) = locate(head) else {
                return Ok(None);
            };
            let linear = Linear::load(&path)?;
            if linear.n_in != n_embd || n_out.is_some_and(|n| n != linear.n_out) {
                return Err(HeadError::Mismatch {
                    path,
                    n_in: linear.n_in,
                    n_out: linear.n_out,
                    n_embd,
                });
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

fn read_safetensors(bytes: &[u8]) -> Result<Tensors, FormatError> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                dtype => return Err(FormatError::UnsupportedDtype { name, dtype }),
            };
            let shape = view.shape().to_vec();
            let values = dtype.decode(view.data(), 0, numel(&shape)?)?;
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
    fn decode(self, bytes: &[u8], offset: usize, numel: usize) -> Result<Vec<f32>, FormatError> {
        let size = self.size();
        let short = |needed| FormatError::ShortData {
            len: bytes.len(),
            needed,
        };
        let start = offset.checked_mul(size).ok_or(short(usize::MAX))?;
        let end = numel
            .checked_mul(size)
            .and_then(|n| n.checked_add(start))
            .ok_or(short(usize::MAX))?;
        let data = bytes.get(start..end).ok_or(short(end))?;
        Ok(data
            .chunks_exact(size)
            .map(|c| match self {
                DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            })
            .collect())
    }

    fn from_storage(name: &str) -> Result<Self, PickleError> {
        match name {
            "FloatStorage" => Ok(DType::F32),
            "HalfStorage" => Ok(DType::F16),
            "BFloat16Storage" => Ok(DType::BF16),
            other => Err(PickleError::UnsupportedStorage(other.to_owned())),
        }
    }
}

/// A torch zip archive: `<prefix>/data.pkl` plus one `<prefix>/data/<key>` per storage.
fn read_torch(bytes: &[u8]) -> Result<Tensors, FormatError> {
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(FormatError::NotZip)?;
    let pkl_name = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .ok_or(FormatError::NoPickle)?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let mut read_member = |name: &str| -> Result<Vec<u8>, FormatError> {
        let mut file = archive
            .by_name(name)
            .map_err(|source| FormatError::Member {
                name: name.to_owned(),
                source,
            })?;
        // The size is the archive's claim: a stored member cannot be larger
        // than the archive holding it (a 4 GiB claim was found by fuzzing).
        let claimed = usize::try_from(file.size()).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(claimed.min(bytes.len()));
        file.read_to_end(&mut out)
            .map_err(|source| FormatError::MemberRead {
                name: name.to_owned(),
                source,
            })?;
        Ok(out)
    };
    let pickle = read_member(&pkl_name)?;
    let Value::Dict(entries) = unpickle(&pickle)? else {
        return Err(FormatError::NotStateDict);
    };
    let mut tensors = Tensors::new();
    for (key, value) in entries {
        let (Value::Str(name), Value::Tensor(t)) = (key, value) else {
            return Err(FormatError::NotNamedTensors);
        };
        let numel = numel(&t.shape)?;
        if !is_contiguous(&t.shape, &t.stride) {
            return Err(FormatError::NotContiguous(name));
        }
        let data = read_member(&format!("{prefix}data/{}", t.storage.key))?;
        let values = t.storage.dtype.decode(&data, t.offset, numel)?;
        tensors.insert(name, (values, t.shape));
    }
    Ok(tensors)
}

/// Elements in a tensor of `shape`, refusing shapes whose count overflows.
fn numel(shape: &[usize]) -> Result<usize, FormatError> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| FormatError::TooLarge(shape.to_vec()))
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&dim, &s) in shape.iter().zip(stride).rev() {
        if dim > 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(dim);
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
    fn int(&self) -> Result<usize, PickleError> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => Err(PickleError::ExpectedInt(format!("{other:?}"))),
        }
    }

    fn ints(&self) -> Result<Vec<usize>, PickleError> {
        match self {
            Value::Tuple(items) | Value::List(items) => items.iter().map(Value::int).collect(),
            other => Err(PickleError::ExpectedInts(format!("{other:?}"))),
        }
    }
}

/// Runs the subset of the pickle machine that `torch.save` uses for a state dict.
fn unpickle(data: &[u8]) -> Result<Value, PickleError> {
    let mut machine = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    loop {
        let op = machine.take(1)?[0];
        if let Some(result) = machine.step(op)? {
            return Ok(result);
        }
    }
}

/// The pickle machine's state: the input, the value stack and the memo.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self.pos.checked_add(n).ok_or(PickleError::Truncated)?;
        let bytes = self.data.get(self.pos..end).ok_or(PickleError::Truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn take_u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::UnterminatedLine)?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack.pop().ok_or(PickleError::StackUnderflow)
    }

    /// The values above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or(PickleError::MarkMissing)?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    /// Runs one opcode; `Some` once STOP returns the result.
    fn step(&mut self, op: u8) -> Result<Option<Value>, PickleError> {
        match op {
            0x80 => {
                self.take(1)?; // PROTO
            }
            0x95 => {
                self.take(8)?; // FRAME
            }
            b'q' | b'r' | 0x94 | b'h' | b'j' => self.memo_op(op)?,
            b'(' | b')' | b']' | b'}' | b'N' | 0x88 | 0x89 => self.stack.push(match op {
                b'(' => Value::Mark,
                b')' => Value::Tuple(Vec::new()),
                b']' => Value::List(Vec::new()),
                b'}' => Value::Dict(Vec::new()),
                b'N' => Value::None,
                _ => Value::Bool,
            }),
            b'K' | b'M' | b'J' | 0x8a | b'G' | b'X' | 0x8c => {
                let value = self.literal(op)?;
                self.stack.push(value);
            }
            b't' | 0x85..=0x87 | b'a' | b'e' | b's' | b'u' => self.container(op)?,
            b'c' | 0x93 | b'Q' | b'R' | b'b' => self.object(op)?,
            b'.' => return self.pop().map(Some),
            other => return Err(PickleError::UnsupportedOpcode(other)),
        }
        Ok(None)
    }

    /// PUT and GET, in their short and long forms, and MEMOIZE.
    fn memo_op(&mut self, op: u8) -> Result<(), PickleError> {
        match op {
            b'q' => {
                let idx = u32::from(self.take(1)?[0]);
                self.memo.insert(idx, top(&self.stack, "BINPUT")?);
            }
            b'r' => {
                let idx = self.take_u32()?;
                self.memo.insert(idx, top(&self.stack, "LONG_BINPUT")?);
            }
            0x94 => {
                let idx = self.memo.len() as u32; // MEMOIZE
                self.memo.insert(idx, top(&self.stack, "MEMOIZE")?);
            }
            b'h' => {
                let idx = u32::from(self.take(1)?[0]);
                self.stack.push(recall(&self.memo, idx, "BINGET")?);
            }
            _ => {
                let idx = self.take_u32()?;
                self.stack.push(recall(&self.memo, idx, "LONG_BINGET")?);
            }
        }
        Ok(())
    }

    /// Integers, floats and strings written inline.
    fn literal(&mut self, op: u8) -> Result<Value, PickleError> {
        Ok(match op {
            b'K' => Value::Int(i64::from(self.take(1)?[0])),
            b'M' => {
                let b = self.take(2)?;
                Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]])))
            }
            b'J' => Value::Int(i64::from(self.take_u32()? as i32)),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = self.take(1)?[0] as usize;
                let b = self.take(n)?;
                if n > 8 {
                    return Err(PickleError::IntegerTooLarge);
                }
                let fill = if b.last().is_some_and(|x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut buf = [fill; 8];
                buf[..n].copy_from_slice(b);
                Value::Int(i64::from_le_bytes(buf))
            }
            b'G' => {
                self.take(8)?; // BINFLOAT: no state dict field needs its value
                Value::Float
            }
            _ => {
                // BINUNICODE (4-byte length) or SHORT_BINUNICODE (1-byte length)
                let n = if op == b'X' {
                    self.take_u32()? as usize
                } else {
                    self.take(1)?[0] as usize
                };
                Value::Str(String::from_utf8_lossy(self.take(n)?).into_owned())
            }
        })
    }

    /// Tuples, and items added to lists and dicts.
    fn container(&mut self, op: u8) -> Result<(), PickleError> {
        match op {
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err(PickleError::StackUnderflow);
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items));
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![self.pop()?]
                } else {
                    self.pop_mark()?
                };
                match self.stack.last_mut() {
                    Some(Value::List(list)) => list.extend(items),
                    _ => return Err(PickleError::Malformed("APPEND to a non-list")),
                }
            }
            _ => {
                let items = if op == b's' {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    vec![k, v]
                } else {
                    self.pop_mark()?
                };
                let Some(Value::Dict(dict)) = self.stack.last_mut() else {
                    return Err(PickleError::Malformed("SETITEMS on a non-dict"));
                };
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    dict.push((k, v));
                }
            }
        }
        Ok(())
    }

    /// Globals, torch's storages (persistent ids), calls and BUILD.
    fn object(&mut self, op: u8) -> Result<(), PickleError> {
        match op {
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack.push(Value::Global(module, name));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                    _ => return Err(PickleError::Malformed("STACK_GLOBAL without names")),
                }
            }
            b'Q' => {
                let Value::Tuple(pid) = self.pop()? else {
                    return Err(PickleError::Malformed("persistent id is not a tuple"));
                };
                let storage = storage_of(&pid)?;
                self.stack.push(Value::Storage(storage));
            }
            b'R' => {
                let args = self.pop()?;
                let Value::Global(module, name) = self.pop()? else {
                    return Err(PickleError::Malformed("REDUCE of something not callable"));
                };
                let Value::Tuple(args) = args else {
                    return Err(PickleError::Malformed("REDUCE arguments are not a tuple"));
                };
                self.stack.push(call(&module, &name, args)?);
            }
            _ => {
                // BUILD: an OrderedDict's state (torch's `_metadata`): not needed.
                self.pop()?;
            }
        }
        Ok(())
    }
}

/// BINPERSID's id: `('storage', StorageType, key, location, numel)`.
fn storage_of(pid: &[Value]) -> Result<Storage, PickleError> {
    let (Some(Value::Global(_, storage_type)), Some(key)) = (pid.get(1), pid.get(2)) else {
        return Err(PickleError::UnsupportedPersistentId(format!("{pid:?}")));
    };
    let key = match key {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => return Err(PickleError::UnsupportedStorageKey(format!("{other:?}"))),
    };
    Ok(Storage {
        dtype: DType::from_storage(storage_type)?,
        key,
    })
}

/// The top of the stack, for a memo write by `op`.
fn top(stack: &[Value], op: &'static str) -> Result<Value, PickleError> {
    stack
        .last()
        .cloned()
        .ok_or(PickleError::MemoOfNothing { op })
}

/// A memoized value, for a memo read by `op`.
fn recall(memo: &HashMap<u32, Value>, idx: u32, op: &'static str) -> Result<Value, PickleError> {
    memo.get(&idx)
        .cloned()
        .ok_or(PickleError::UnknownMemo { op })
}

/// The few callables a state dict's pickle invokes.
fn call(module: &str, name: &str, args: Vec<Value>) -> Result<Value, PickleError> {
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") => {
            let mut args = args.into_iter();
            let (Some(Value::Storage(storage)), Some(offset), Some(shape), Some(stride)) =
                (args.next(), args.next(), args.next(), args.next())
            else {
                return Err(PickleError::Malformed("malformed _rebuild_tensor_v2 call"));
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
            _ => Err(PickleError::Malformed("malformed _rebuild_parameter call")),
        },
        _ => Err(PickleError::UnsupportedGlobal {
            module: module.to_owned(),
            name: name.to_owned(),
        }),
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
    fn errors_name_the_file_and_what_is_wrong_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pt");
        let err = Linear::load(&missing).unwrap_err();
        assert!(matches!(err, HeadError::Read { .. }), "{err:?}");
        assert!(err
            .to_string()
            .starts_with(&format!("{}: ", missing.display())));

        let garbage = dir.path().join("x.safetensors");
        std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
        let err = Linear::load(&garbage).unwrap_err();
        assert!(
            matches!(
                &err,
                HeadError::Format {
                    source: FormatError::Safetensors(_),
                    ..
                }
            ),
            "{err:?}"
        );

        let not_zip = dir.path().join("x.pt");
        std::fs::write(&not_zip, b"not a zip").unwrap();
        let err = Linear::load(&not_zip).unwrap_err();
        assert!(
            matches!(
                &err,
                HeadError::Format {
                    source: FormatError::NotZip(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(": not a PyTorch zip archive: "),
            "{err}"
        );

        // A pickle cut short, an opcode torch.save never writes, a global it never calls.
        assert!(matches!(
            unpickle(&[0x80, 2, b'K']),
            Err(PickleError::Truncated)
        ));
        assert!(matches!(
            unpickle(&[0x80, 2, b'I']),
            Err(PickleError::UnsupportedOpcode(b'I'))
        ));
        let err = unpickle(b"cos\nsystem\n)R.").unwrap_err();
        assert_eq!(err.to_string(), "unsupported pickle global os.system");
        assert_eq!(
            unpickle(b"q\x00").unwrap_err().to_string(),
            "BINPUT on empty stack"
        );
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
        assert!(
            matches!(
                err,
                HeadError::Mismatch {
                    n_in: 384,
                    n_embd: 1024,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("hidden size is 1024"), "{err}");
    }
}
