//! How the CLI shows the server's answers: human tables and `key: value` lines by default, the
//! JSON itself with `--output json` (for scripts).

use std::sync::OnceLock;

use comfy_table::{Table, presets};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    /// The server's answer as YAML.
    Yaml,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Chosen once, from `--output`, before any verb prints.
pub fn set_format(f: Format) {
    let _ = FORMAT.set(f);
}

pub fn format() -> Format {
    FORMAT.get().copied().unwrap_or(Format::Table)
}

/// JSON or YAML: the server's answer as it is, not shaped for people.
pub fn for_scripts() -> bool {
    format() != Format::Table
}

/// Longest cell in a table; the rest is cut (the JSON output has everything).
const MAX_CELL: usize = 48;

pub fn print(v: &Value) -> anyhow::Result<()> {
    match format() {
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(v)?),
        Format::Table => print!("{}", human(v)),
    }
    Ok(())
}

/// A listing (an array of objects, bare or as the one array field of an object) becomes a
/// table, other fields `key: value` lines; nested objects are flattened with dotted keys.
pub fn human(v: &Value) -> String {
    match v {
        Value::Array(rows) if rows.iter().all(Value::is_object) => table(rows),
        Value::Object(map) => {
            let mut out = String::new();
            let listing = map
                .iter()
                .filter(|(_, v)| is_rows(v))
                .map(|(k, _)| k)
                .collect::<Vec<_>>();
            if let [only] = listing.as_slice()
                && map.iter().all(|(k, v)| k == *only || !v.is_object())
            {
                if let Some(Value::Array(rows)) = map.get(*only) {
                    out.push_str(&table(rows));
                }
                for (k, v) in map.iter().filter(|(k, _)| k != only) {
                    out.push_str(&format!("{k}: {}\n", cell(k, v)));
                }
                return out;
            }
            fields(&mut out, "", map);
            out
        }
        other => format!("{}\n", scalar(other)),
    }
}

fn is_rows(v: &Value) -> bool {
    matches!(v, Value::Array(rows) if !rows.is_empty() && rows.iter().all(Value::is_object))
}

fn fields(out: &mut String, prefix: &str, map: &serde_json::Map<String, Value>) {
    for (k, v) in map {
        let key = format!("{prefix}{k}");
        match v {
            Value::Object(inner) if !inner.is_empty() => fields(out, &format!("{key}."), inner),
            v if is_rows(v) => {
                out.push_str(&format!("{key}:\n"));
                if let Value::Array(rows) = v {
                    for line in table(rows).lines() {
                        out.push_str(&format!("  {line}\n"));
                    }
                }
            }
            v => out.push_str(&format!("{key}: {}\n", cell(k, v))),
        }
    }
}

/// Columns are the first row's keys, in order (rows of a listing share a shape), except those
/// holding objects: a table cell is no place for them (`show` and `--output json` have them).
fn table(rows: &[Value]) -> String {
    if rows.is_empty() {
        return "(none)\n".into();
    }
    let columns: Vec<String> = rows[0]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| !v.is_object() && !is_rows(v))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(columns.iter().map(|c| c.to_uppercase()));
    for row in rows {
        t.add_row(columns.iter().map(|c| cut(&cell(c, &row[c.as_str()]))));
    }
    let mut text = t.to_string();
    text.push('\n');
    // The preset pads every line with a leading space; a listing reads better flush left.
    text.lines()
        .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l).trim_end()))
        .collect()
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Array(items) if items.is_empty() => "(none)".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            items.iter().map(scalar).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
}

/// A field's text in a table: times (`at` and `…_at` fields, ms since the Unix epoch) in
/// RFC 3339 UTC, for people (`--output json` keeps the numbers); the rest as [`scalar`].
fn cell(key: &str, v: &Value) -> String {
    if (key == "at" || key.ends_with("_at"))
        && let Some(text) = v.as_u64().and_then(rfc3339)
    {
        return text;
    }
    scalar(v)
}

/// `ms` since the Unix epoch as RFC 3339 UTC (milliseconds when not whole seconds); `None`
/// past what it can show.
fn rfc3339(ms: u64) -> Option<String> {
    let nanos = i128::from(ms).checked_mul(1_000_000)?;
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    at.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_CELL {
        return s.to_string();
    }
    let mut out: String = s.chars().take(MAX_CELL - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listings_become_tables_and_objects_key_value_lines() {
        let t = human(&json!({"topics": [
            {"name": "orders", "queues": 4, "messages": 12},
            {"name": "audit", "queues": 1, "messages": null},
        ]}));
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].contains("QUEUES"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("orders") && lines[1].contains("12"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("audit") && lines[2].ends_with('-'),
            "{t}"
        );

        let s = human(
            &json!({"group": "g", "spec": {"topic": "t", "retry": {"max_attempts": 3}},
                              "queues": [{"queue": 0, "lag": 5}], "tags": ["a", "b"]}),
        );
        assert!(s.contains("group: g\n"), "{s}");
        assert!(s.contains("spec.retry.max_attempts: 3\n"), "{s}");
        assert!(s.contains("tags: a,b\n"), "{s}");
        assert!(s.contains("queues:\n  QUEUE"), "{s}");

        let page = human(&json!({"entries": [], "next": null}));
        assert!(page.contains("next: -"), "{page}");
        assert!(page.contains("entries: (none)"), "{page}");
        assert_eq!(cut(&"x".repeat(100)).chars().count(), MAX_CELL);
    }

    #[test]
    fn times_read_as_rfc3339_in_tables_and_stay_numbers_elsewhere() {
        let t = human(&json!({"entries": [
            {"id": "a", "died_at": 1_764_547_200_123_u64, "attempts": 3},
        ]}));
        assert!(t.contains("2025-12-01T00:00:00.123Z"), "{t}");
        assert!(t.contains('3'), "{t}");
        let s = human(
            &json!({"id": "t1", "created_at": 0, "history": [{"at": 86_400_000}],
                              "checks": 1_764_547_200_123_u64}),
        );
        assert!(s.contains("created_at: 1970-01-01T00:00:00Z"), "{s}");
        assert!(s.contains("1970-01-02T00:00:00Z"), "{s}");
        assert!(s.contains("checks: 1764547200123"), "not a time field: {s}");
        // Past year 9999 the number stays.
        assert!(human(&json!({"next_at": u64::MAX})).contains(&u64::MAX.to_string()));
    }
}
