//! Filters on documents' metadata, as clients write them: an object whose
//! fields must equal the document's (`{"source": "docker-docs"}`), or be one
//! of a list (`{"type": ["faq", "guide"]}`). They become SQL conditions on
//! the documents' JSON metadata, with every value bound as a parameter.

use rusqlite::types::Value as SqlValue;
use serde_json::{Map, Value};

use crate::RagError;

/// Most fields, and values over all fields, in one filter (SQLite binds at
/// most 32,766 parameters per statement).
const MAX_FIELDS: usize = 32;
const MAX_VALUES: usize = 1_000;

/// A checked metadata filter.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    /// Field name and the values it may have (one for equality): strings,
    /// integers or booleans.
    fields: Vec<(String, Vec<Value>)>,
}

impl Filter {
    /// A filter from a client's object; field names are top-level metadata
    /// fields, values strings, integers, booleans or non-empty lists of one kind.
    pub fn from_object(filter: &Map<String, Value>) -> Result<Option<Filter>, RagError> {
        let values: usize = filter
            .values()
            .map(|v| v.as_array().map_or(1, Vec::len))
            .sum();
        if filter.len() > MAX_FIELDS || values > MAX_VALUES {
            return Err(RagError::invalid(
                "filter",
                format!("a filter has at most {MAX_FIELDS} fields and {MAX_VALUES} values"),
            ));
        }
        let mut fields = Vec::with_capacity(filter.len());
        for (key, value) in filter {
            let plain = !key.is_empty()
                && key.len() <= 128
                && key
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-');
            if !plain {
                return Err(RagError::invalid(
                    "filter",
                    format!("filter field {key:?}: name a top-level metadata field (letters, digits, '_' or '-')"),
                ));
            }
            let values = match value {
                Value::Array(items) if !items.is_empty() => {
                    let scalars = items.iter().all(|v| scalar(v).is_some());
                    let same_kind = items.windows(2).all(|w| kind(&w[0]) == kind(&w[1]));
                    (scalars && same_kind).then(|| items.clone())
                }
                other => scalar(other).map(|_| vec![other.clone()]),
            };
            let Some(values) = values else {
                return Err(RagError::invalid(
                    "filter",
                    format!(
                        "filter field {key:?}: give a string, an integer, a boolean, or a \
                         non-empty list of values of one of those kinds"
                    ),
                ));
            };
            fields.push((key.clone(), values));
        }
        Ok((!fields.is_empty()).then_some(Filter { fields }))
    }

    /// Each field's name and the values it may have.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&str, &[Value])> {
        self.fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The SQL condition on `column` (the documents' JSON metadata), and the
    /// parameters it binds, in order.
    pub(crate) fn sql(&self, column: &str) -> (String, Vec<SqlValue>) {
        let mut conditions = Vec::with_capacity(self.fields.len());
        let mut params = Vec::new();
        for (key, values) in &self.fields {
            params.push(SqlValue::Text(format!("$.\"{key}\"")));
            let marks = vec!["?"; values.len()].join(", ");
            conditions.push(format!("json_extract({column}, ?) IN ({marks})"));
            params.extend(values.iter().filter_map(scalar));
        }
        (conditions.join(" AND "), params)
    }
}

fn scalar(value: &Value) -> Option<SqlValue> {
    match value {
        Value::String(s) => Some(SqlValue::Text(s.clone())),
        // SQLite's JSON functions read booleans as 1 and 0.
        Value::Bool(b) => Some(SqlValue::Integer(i64::from(*b))),
        Value::Number(n) => n.as_i64().map(SqlValue::Integer),
        _ => None,
    }
}

fn kind(value: &Value) -> u8 {
    match value {
        Value::String(_) => 0,
        Value::Bool(_) => 1,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn equality_and_any_of_become_bound_conditions() {
        let filter = Filter::from_object(&object(json!({"source": "k8s", "type": ["a", "b"]})))
            .unwrap()
            .unwrap();
        let (sql, params) = filter.sql("d.metadata");
        assert_eq!(
            sql,
            "json_extract(d.metadata, ?) IN (?) AND json_extract(d.metadata, ?) IN (?, ?)"
        );
        assert_eq!(params.len(), 5);
        assert_eq!(params[0], SqlValue::Text("$.\"source\"".into()));
        assert!(Filter::from_object(&Map::new()).unwrap().is_none());
    }

    #[test]
    fn nested_names_floats_objects_and_mixed_lists_are_refused() {
        for bad in [
            json!({"a.b": "x"}),
            json!({"a\"": "x"}),
            json!({"x": 1.5}),
            json!({"x": {"y": 1}}),
            json!({"x": []}),
            json!({"x": [1, "a"]}),
            json!({"x": null}),
            json!({"x": (0..1001).collect::<Vec<_>>()}),
        ] {
            assert!(
                matches!(
                    Filter::from_object(&object(bad.clone())),
                    Err(RagError::Invalid {
                        param: "filter",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }
}
