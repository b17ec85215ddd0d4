//! Built-in functions: time and date helpers the server
//! can run itself when a request sets `execute_builtin_functions`, listed at
//! `GET /v1/functions`.
//!
//! Adding one: write a `fn(&Value) -> Result<Value, String>` that reads its
//! arguments object, and add a [`Builtin`] entry with its JSON schema to
//! [`registry`]. The schema is what the model sees and what constrained calls
//! follow; the function still checks its arguments, since `auto` calls are not
//! constrained.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};

pub struct Builtin {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON schema of the arguments object.
    pub parameters: fn() -> Value,
    pub run: fn(&Value) -> Result<Value, String>,
}

pub fn registry() -> &'static [Builtin] {
    &[
        Builtin {
            name: "get_current_time",
            description: "Get the current date and time in a time zone.",
            parameters: || {
                json!({"type": "object", "properties": {
                    "timezone": {"type": "string", "description": "IANA time zone such as Europe/Paris; UTC when omitted"}
                }})
            },
            run: current_time,
        },
        Builtin {
            name: "convert_timezone",
            description: "Convert a date and time from one time zone to another.",
            parameters: || {
                json!({"type": "object", "properties": {
                    "datetime": {"type": "string", "description": "ISO 8601 date and time, e.g. 2026-03-01T09:30:00"},
                    "from_timezone": {"type": "string", "description": "IANA time zone of datetime"},
                    "to_timezone": {"type": "string", "description": "IANA time zone to convert to"}
                }, "required": ["datetime", "from_timezone", "to_timezone"]})
            },
            run: convert_timezone,
        },
        Builtin {
            name: "add_to_date",
            description: "Add (or with negative numbers subtract) weeks, days, hours and minutes to a date or date and time.",
            parameters: || {
                json!({"type": "object", "properties": {
                    "date": {"type": "string", "description": "ISO 8601 date or date and time"},
                    "weeks": {"type": "integer"},
                    "days": {"type": "integer"},
                    "hours": {"type": "integer"},
                    "minutes": {"type": "integer"}
                }, "required": ["date"]})
            },
            run: add_to_date,
        },
        Builtin {
            name: "days_between",
            description: "Count the days from one date to another (negative when the end is earlier).",
            parameters: || {
                json!({"type": "object", "properties": {
                    "start_date": {"type": "string", "description": "ISO 8601 date"},
                    "end_date": {"type": "string", "description": "ISO 8601 date"}
                }, "required": ["start_date", "end_date"]})
            },
            run: days_between,
        },
    ]
}

pub fn find(name: &str) -> Option<&'static Builtin> {
    registry().iter().find(|b| b.name == name)
}

/// Runs a call's JSON arguments text; a failure is reported to the model as
/// `{"error": ...}`, so it can correct itself.
pub fn execute(builtin: &Builtin, arguments: &str) -> Value {
    let result = serde_json::from_str::<Value>(arguments)
        .map_err(|e| format!("arguments are not JSON: {e}"))
        .and_then(|args| {
            if args.is_object() {
                (builtin.run)(&args)
            } else {
                Err("arguments must be a JSON object".to_owned())
            }
        });
    result.unwrap_or_else(|error| json!({ "error": error }))
}

fn string_arg<'a>(args: &'a Value, name: &str) -> Result<Option<&'a str>, String> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{name} must be a string")),
    }
}

fn required<'a>(args: &'a Value, name: &str) -> Result<&'a str, String> {
    string_arg(args, name)?.ok_or_else(|| format!("{name} is required"))
}

fn zone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("unknown time zone {name:?}; use an IANA name such as Europe/Paris"))
}

fn describe<T: TimeZone>(at: &DateTime<T>, zone: &str) -> Value
where
    T::Offset: std::fmt::Display,
{
    json!({
        "timezone": zone,
        "datetime": at.to_rfc3339(),
        "date": at.format("%Y-%m-%d").to_string(),
        "time": at.format("%H:%M:%S").to_string(),
        "weekday": at.format("%A").to_string(),
        "utc_offset": at.offset().fix().to_string(),
        "unix": at.timestamp(),
    })
}

fn current_time(args: &Value) -> Result<Value, String> {
    let name = string_arg(args, "timezone")?.unwrap_or("UTC");
    let tz = zone(name)?;
    Ok(describe(&Utc::now().with_timezone(&tz), name))
}

/// A date and time, with or without an offset; a bare date is midnight.
fn parse_datetime(
    text: &str,
) -> Result<(NaiveDateTime, Option<DateTime<chrono::FixedOffset>>), String> {
    if let Ok(with_offset) = DateTime::parse_from_rfc3339(text) {
        return Ok((with_offset.naive_local(), Some(with_offset)));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return Ok((naive, None));
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(|d| (d.and_hms_opt(0, 0, 0).expect("midnight exists"), None))
        .map_err(|_| format!("{text:?} is not an ISO 8601 date or date and time"))
}

fn convert_timezone(args: &Value) -> Result<Value, String> {
    let (naive, with_offset) = parse_datetime(required(args, "datetime")?)?;
    let from_name = required(args, "from_timezone")?;
    let to_name = required(args, "to_timezone")?;
    let (from, to) = (zone(from_name)?, zone(to_name)?);
    let instant = match with_offset {
        Some(at) => at.with_timezone(&Utc),
        None => from
            .from_local_datetime(&naive)
            .earliest()
            .ok_or_else(|| {
                format!("{naive} does not exist in {from_name} (a clock change skips it)")
            })?
            .with_timezone(&Utc),
    };
    Ok(json!({
        "from": describe(&instant.with_timezone(&from), from_name),
        "to": describe(&instant.with_timezone(&to), to_name),
    }))
}

fn int_arg(args: &Value, name: &str) -> Result<i64, String> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
            .filter(|n| n.abs() <= 1_000_000)
            .ok_or_else(|| format!("{name} must be a whole number between -1000000 and 1000000")),
    }
}

fn add_to_date(args: &Value) -> Result<Value, String> {
    let text = required(args, "date")?;
    let (naive, with_offset) = parse_datetime(text)?;
    let delta = Duration::weeks(int_arg(args, "weeks")?)
        + Duration::days(int_arg(args, "days")?)
        + Duration::hours(int_arg(args, "hours")?)
        + Duration::minutes(int_arg(args, "minutes")?);
    let date_only = with_offset.is_none() && !text.contains(['T', ' ']);
    let result = match with_offset {
        Some(at) => at
            .checked_add_signed(delta)
            .map(|r| r.to_rfc3339())
            .ok_or("the result is out of range")?,
        None => {
            let r = naive
                .checked_add_signed(delta)
                .ok_or("the result is out of range")?;
            if date_only {
                r.format("%Y-%m-%d").to_string()
            } else {
                r.format("%Y-%m-%dT%H:%M:%S").to_string()
            }
        }
    };
    let weekday = parse_datetime(&result)?.0.format("%A").to_string();
    Ok(json!({"result": result, "weekday": weekday}))
}

fn days_between(args: &Value) -> Result<Value, String> {
    let start = parse_datetime(required(args, "start_date")?)?.0.date();
    let end = parse_datetime(required(args, "end_date")?)?.0.date();
    Ok(json!({"days": (end - start).num_days()}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, args: Value) -> Value {
        execute(find(name).unwrap(), &args.to_string())
    }

    #[test]
    fn converts_time_zones_across_daylight_saving() {
        let out = run(
            "convert_timezone",
            json!({"datetime": "2026-07-01T12:00:00", "from_timezone": "Europe/Paris", "to_timezone": "America/New_York"}),
        );
        assert_eq!(out["to"]["time"], "06:00:00", "{out}");
        let winter = run(
            "convert_timezone",
            json!({"datetime": "2026-01-15 12:00", "from_timezone": "Europe/Paris", "to_timezone": "Asia/Tokyo"}),
        );
        assert_eq!(winter["to"]["time"], "20:00:00", "{winter}");
        assert_eq!(winter["to"]["utc_offset"], "+09:00");
    }

    #[test]
    fn date_arithmetic() {
        let out = run("add_to_date", json!({"date": "2026-02-27", "days": 2}));
        assert_eq!(out["result"], "2026-03-01");
        assert_eq!(out["weekday"], "Sunday");
        let out = run(
            "add_to_date",
            json!({"date": "2026-03-01T10:00:00", "hours": -11, "weeks": 1}),
        );
        assert_eq!(out["result"], "2026-03-07T23:00:00");
        assert_eq!(
            run(
                "days_between",
                json!({"start_date": "2026-01-01", "end_date": "2026-12-25"})
            )["days"],
            358
        );
    }

    #[test]
    fn current_time_is_now() {
        let out = run("get_current_time", json!({"timezone": "Asia/Kolkata"}));
        assert_eq!(out["utc_offset"], "+05:30");
        let unix = out["unix"].as_i64().unwrap();
        assert!((unix - Utc::now().timestamp()).abs() < 5);
    }

    #[test]
    fn bad_arguments_are_reported_to_the_model() {
        assert!(
            run("get_current_time", json!({"timezone": "Mars/Olympus"}))["error"]
                .as_str()
                .unwrap()
                .contains("unknown time zone")
        );
        assert!(run("add_to_date", json!({"date": "yesterday"}))["error"].is_string());
        assert!(
            run("add_to_date", json!({"date": "2026-01-01", "days": 1e12}))["error"].is_string()
        );
        assert!(execute(find("days_between").unwrap(), "not json")["error"].is_string());
        assert!(execute(find("days_between").unwrap(), "[1]")["error"].is_string());
    }
}
