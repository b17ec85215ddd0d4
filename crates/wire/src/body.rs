//! Reading a request body: exactly one JSON value of the expected shape, and
//! when it is not, a message and the offending field's path for a 400.

use serde::de::DeserializeOwned;

/// Why a body was refused: `message` for the client, `param` the field's path
/// (`messages[0].content`) where one is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    pub message: String,
    pub param: Option<String>,
    /// `missing_required_parameter` for a required field left out, as
    /// OpenAI says it.
    pub code: Option<&'static str>,
}

/// Parses `bytes` as one JSON value of type `T` followed by nothing but
/// whitespace.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => match de.end() {
            Ok(()) => Ok(value),
            Err(e) => Err(BodyError {
                message: format!("could not parse the JSON body: {e}"),
                param: None,
                code: None,
            }),
        },
        Err(err) => {
            let mut path = err.path().to_string();
            if path == "." {
                path = flattened_field_path(bytes).unwrap_or(path);
            }
            let inner = err.into_inner();
            let syntax = inner.is_syntax() || inner.is_eof();
            let message = if syntax {
                format!("could not parse the JSON body: {inner}")
            } else {
                format!("invalid request body: {inner}")
            };
            // serde names a missing field in its message, not its path.
            let missing = inner
                .to_string()
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned);
            if let Some(field) = missing {
                let param = if path == "." {
                    field
                } else {
                    format!("{path}.{field}")
                };
                return Err(BodyError {
                    message: format!("invalid request body: {param} is required"),
                    param: Some(param),
                    code: Some("missing_required_parameter"),
                });
            }
            let param = (path != "." && !syntax).then_some(path);
            Err(BodyError {
                message,
                param,
                code: None,
            })
        }
    }
}

/// Fields inside `#[serde(flatten)]` lose their path in serde's error; the shared
/// sampling fields are the flattened ones, so read them alone to name the field.
fn flattened_field_path(bytes: &[u8]) -> Option<String> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let err = serde_path_to_error::deserialize::<_, crate::SamplingFields>(de).err()?;
    let path = err.path().to_string();
    (path != ".").then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChatCompletionRequest;

    #[test]
    fn a_wrong_type_names_its_field_and_trailing_values_are_refused() {
        let err = parse_body::<ChatCompletionRequest>(
            br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"));
        let err = parse_body::<ChatCompletionRequest>(
            br#"{"model": "m", "messages": []} {"model": "m"}"#,
        )
        .unwrap_err();
        assert!(err.message.contains("trailing characters"), "{err:?}");
        assert_eq!(err.param, None);
    }

    #[test]
    fn a_missing_field_is_named_as_openai_names_it() {
        let err = parse_body::<ChatCompletionRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages"));
        assert_eq!(err.code, Some("missing_required_parameter"));
        assert!(err.message.contains("messages is required"), "{err:?}");
        let err = parse_body::<crate::EmbeddingRequest>(br#"{"input": "x"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("model"));
    }
}
