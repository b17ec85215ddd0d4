//! Python's `json.dumps`, as the `tojson` filter of `transformers` calls it.
//! Tool schemas reach the model through it, so its exact bytes matter:
//! minijinja's built-in `tojson` HTML-escapes `<>&'` and serde_json's
//! formatters cannot express Python's separators, float repr or `ensure_ascii`.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False,
/// indent=indent, separators=separators, sort_keys=sort_keys)`.
pub(super) fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(text) => Some(text.to_owned()),
            // Python treats a negative indent like 0: newlines, no indentation.
            None => Some(" ".repeat(usize::try_from(i64::try_from(v)?.max(0)).unwrap_or(0))),
        },
        None => None,
    };
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be an (item, key) pair",
            ))
        }
        // Python drops the space after "," when indenting, to avoid trailing spaces.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let json = serde_json::to_value(value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let dumper = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    dumper.write(&mut out, &json, 0);
    Ok(Value::from_safe_string(out))
}

/// A Python `json.dumps` lookalike. serde_json's formatters cannot express
/// Python's separators, float repr (`1e+16`, `1.0`) or `ensure_ascii`.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, out: &mut String, value: &serde_json::Value, depth: usize) {
        match value {
            serde_json::Value::Null => out.push_str("null"),
            serde_json::Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => write_py_float(out, f),
                _ => {
                    let _ = write!(out, "{n}");
                }
            },
            serde_json::Value::String(s) => self.write_str(out, s),
            serde_json::Value::Array(items) => {
                self.write_container(out, depth, ('[', ']'), items, |out, item| {
                    self.write(out, item, depth + 1);
                });
            }
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                self.write_container(out, depth, ('{', '}'), &entries, |out, (key, item)| {
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write(out, item, depth + 1);
                });
            }
        }
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        depth: usize,
        (open, close): (char, char),
        items: &[T],
        mut write_item: impl FnMut(&mut String, &T),
    ) {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return;
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, depth + 1);
            write_item(out, item);
        }
        self.newline(out, depth);
        out.push(close);
    }

    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if c < ' ' || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional notation for
/// exponents in [-4, 16), otherwise `1e+16` / `1.5e-07` style.
fn write_py_float(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("NaN");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        let scientific = format!("{f:e}");
        let (mantissa, exponent) = scientific
            .split_once('e')
            .expect("`{:e}` output always has an exponent");
        let exponent: i32 = exponent.parse().expect("`{:e}` exponent is an integer");
        if (-4..16).contains(&exponent) {
            let positional = f.to_string();
            out.push_str(&positional);
            if !positional.contains('.') {
                out.push_str(".0");
            }
        } else {
            let sign = if exponent < 0 { '-' } else { '+' };
            let _ = write!(out, "{mantissa}e{sign}{:02}", exponent.unsigned_abs());
        }
    }
}

#[cfg(test)]
mod tests {
    use minijinja::value::Serde;
    use minijinja::Environment;
    use serde_json::json;

    #[test]
    fn tojson_is_python_json_dumps() {
        let mut env = Environment::new();
        env.add_filter("tojson", super::tojson);
        let ctx = json!({
            "x": {"s": "<a href='x'>&°C\n\"\u{1}\u{1F600}", "n": [1, 2.5, null, true, {}, []]},
            "y": {"b": 1, "a": {"d": 1, "c": 2}},
            "f": [1.0, 1e16, 1.5e-7, 0.0001, -0.0, 123456789012345.6, 18446744073709551615u64],
        });
        for (source, expected) in [
            (
                "{{ x | tojson }}",
                r#"{"s": "<a href='x'>&°C\n\"\u0001😀", "n": [1, 2.5, null, true, {}, []]}"#,
            ),
            (
                "{{ x.n | tojson(indent=2) }}",
                "[\n  1,\n  2.5,\n  null,\n  true,\n  {},\n  []\n]",
            ),
            (
                "{{ y | tojson(indent='\t') }}",
                "{\n\t\"b\": 1,\n\t\"a\": {\n\t\t\"d\": 1,\n\t\t\"c\": 2\n\t}\n}",
            ),
            (
                "{{ x.n | tojson(indent=0) }}",
                "[\n1,\n2.5,\nnull,\ntrue,\n{},\n[]\n]",
            ),
            (
                "{{ y.a | tojson(indent=1, separators=(', ', ': ')) }}",
                "{\n \"d\": 1, \n \"c\": 2\n}",
            ),
            (
                "{{ x.n | tojson(separators=(',', ':')) }}",
                "[1,2.5,null,true,{},[]]",
            ),
            (
                "{{ y | tojson(sort_keys=true) }}",
                r#"{"a": {"c": 2, "d": 1}, "b": 1}"#,
            ),
            (
                "{{ x.s | tojson(ensure_ascii=true) }}",
                r#""<a href='x'>&\u00b0C\n\"\u0001\ud83d\ude00""#,
            ),
            (
                "{{ f | tojson }}",
                "[1.0, 1e+16, 1.5e-07, 0.0001, -0.0, 123456789012345.6, 18446744073709551615]",
            ),
            (
                "{{ 'a' | tojson }}{{ 3 | tojson }}{{ none | tojson }}",
                r#""a"3null"#,
            ),
        ] {
            let got = env
                .render_str(source, Serde(&ctx))
                .unwrap_or_else(|e| panic!("{source}: {e}"));
            assert_eq!(got, expected, "{source}");
        }
        assert!(env
            .render_str("{{ 1 | tojson(separators=(',',)) }}", ())
            .is_err());
        assert!(env.render_str("{{ 1 | tojson(bogus=1) }}", ()).is_err());
    }
}
