//! `{{field}}` templates filled from a message's JSON body (dotted paths reach nested fields),
//! as the notifier plugins' configs use them: `"subject": "Welcome {{user.name}}"`.

use serde_json::Value;

/// A rendered template, and the fields it named that the data did not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub missing: Vec<String>,
}

/// Fills every `{{ path }}` of `template` from `data`; strings go in as they are, other values
/// as JSON; a missing field renders empty and is listed in `missing`.
pub fn render(template: &str, data: &Value) -> Rendered {
    let mut text = String::with_capacity(template.len());
    let mut missing = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        text.push_str(&rest[..start]);
        let path = rest[start + 2..start + 2 + len].trim();
        match lookup(data, path) {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Null) | None => missing.push(path.to_string()),
            Some(other) => text.push_str(&other.to_string()),
        }
        rest = &rest[start + 2 + len + 2..];
    }
    text.push_str(rest);
    Rendered { text, missing }
}

/// A recipient rendered from its template: `None` if a field it names is missing or it is blank
/// (a notifier rejects such a message: retrying cannot give it a recipient).
pub fn recipient(template: &str, data: &Value) -> Option<String> {
    let r = render(template, data);
    let to = r.text.trim();
    (r.missing.is_empty() && !to.is_empty()).then(|| to.to_string())
}

fn lookup<'a>(data: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(data, |v, part| match v {
        Value::Object(m) => m.get(part),
        Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fills_fields_and_reports_missing_ones() {
        let data = json!({"name": "Ann", "user": {"email": "ann@example.com", "age": 31}, "tags": ["a", "b"]});
        let r = render(
            "Hi {{name}} <{{ user.email }}>, {{user.age}} {{tags.1}}",
            &data,
        );
        assert_eq!(r.text, "Hi Ann <ann@example.com>, 31 b");
        assert!(r.missing.is_empty());
        let r = render("to {{phone}}{{user.zip}}!", &data);
        assert_eq!((r.text.as_str(), r.missing.len()), ("to !", 2));
        assert_eq!(render("no {{ end", &data).text, "no {{ end");
    }

    #[test]
    fn recipients_must_be_present_and_not_blank() {
        let data = json!({"email": " ann@example.com ", "blank": "  "});
        assert_eq!(
            recipient("{{email}}", &data).as_deref(),
            Some("ann@example.com")
        );
        assert_eq!(recipient("{{phone}}", &data), None);
        assert_eq!(recipient("{{blank}}", &data), None);
    }
}
