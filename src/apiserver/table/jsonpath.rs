//! The subset of Kubernetes JSONPath that printer columns use:
//! `.a.b`, `.a[0]`, `.a[-1]`, `.a[*].b`, `['dotted.key']`, `a\.b`,
//! and filters `[?(@.type=="Ready")]` (`==`, `!=`, string or number
//! literals, or bare `[?(@.x)]` for presence). Braces around the whole
//! expression (`{.status.phase}`) are accepted.

use serde_json::Value;

/// One step of a parsed path.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Field(String),
    Index(i64),
    All,
    Filter {
        path: Vec<Step>,
        op: Option<(bool, Value)>,
    },
}

/// A parsed JSONPath expression.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonPath {
    steps: Vec<Step>,
}

/// Why a JSONPath expression did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unrecognized JSONPath {expr:?}: {reason}")]
pub struct JsonPathError {
    expr: String,
    reason: String,
}

impl JsonPath {
    /// Parses an expression such as `.status.conditions[?(@.type=="Ready")].status`.
    pub fn parse(expr: &str) -> Result<Self, JsonPathError> {
        let err = |reason: &str| JsonPathError {
            expr: expr.to_string(),
            reason: reason.to_string(),
        };
        let mut s = expr.trim();
        if let Some(inner) = s.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            s = inner.trim();
        }
        let steps = parse_steps(s).map_err(|r| err(&r))?;
        Ok(Self { steps })
    }

    /// All values the path selects in `v`, in document order.
    pub fn find<'a>(&self, v: &'a Value) -> Vec<&'a Value> {
        eval(&self.steps, v)
    }
}

fn parse_steps(s: &str) -> Result<Vec<Step>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut steps = Vec::new();
    if chars.first() == Some(&'$') {
        i = 1;
    }
    while i < chars.len() {
        match chars[i] {
            '.' => {
                i += 1;
                let mut name = String::new();
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    name.push(chars[i]);
                    i += 1;
                }
                if name == "*" {
                    steps.push(Step::All);
                } else if !name.is_empty() {
                    steps.push(Step::Field(name));
                }
            }
            '[' => {
                let end = matching_bracket(&chars, i).ok_or("unclosed [")?;
                let inner: String = chars[i + 1..end].iter().collect();
                steps.push(parse_bracket(inner.trim())?);
                i = end + 1;
            }
            c if steps.is_empty() && (c.is_alphanumeric() || c == '_' || c == '@') => {
                // A path without a leading dot: `status.phase`.
                let rest: String = chars[i..].iter().collect();
                let rest = rest.strip_prefix('@').unwrap_or(&rest);
                let mut more = parse_steps(&format!(".{}", rest.trim_start_matches('.')))?;
                steps.append(&mut more);
                return Ok(steps);
            }
            c => return Err(format!("unexpected character {c:?}")),
        }
    }
    Ok(steps)
}

fn matching_bracket(chars: &[char], open: usize) -> Option<usize> {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    for (j, &c) in chars.iter().enumerate().skip(open) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '[') => depth += 1,
            (None, ']') => {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            _ => {}
        }
    }
    None
}

fn unquote(s: &str) -> Option<&str> {
    s.strip_prefix('\'')
        .and_then(|x| x.strip_suffix('\''))
        .or_else(|| s.strip_prefix('"').and_then(|x| x.strip_suffix('"')))
}

fn parse_bracket(inner: &str) -> Result<Step, String> {
    if inner == "*" {
        return Ok(Step::All);
    }
    if let Some(k) = unquote(inner) {
        return Ok(Step::Field(k.to_string()));
    }
    if let Ok(n) = inner.parse::<i64>() {
        return Ok(Step::Index(n));
    }
    let Some(expr) = inner
        .strip_prefix("?(")
        .and_then(|x| x.strip_suffix(')'))
        .map(str::trim)
    else {
        return Err(format!("unsupported subscript [{inner}]"));
    };
    let (lhs, op) = if let Some((l, r)) = expr.split_once("==") {
        (l.trim(), Some((true, literal(r.trim())?)))
    } else if let Some((l, r)) = expr.split_once("!=") {
        (l.trim(), Some((false, literal(r.trim())?)))
    } else {
        (expr, None)
    };
    let lhs = lhs.strip_prefix('@').ok_or("filter must start with @")?;
    Ok(Step::Filter {
        path: parse_steps(lhs)?,
        op,
    })
}

fn literal(s: &str) -> Result<Value, String> {
    if let Some(q) = unquote(s) {
        return Ok(Value::String(q.to_string()));
    }
    match s {
        "true" => Ok(Value::Bool(true)),
        "false" => Ok(Value::Bool(false)),
        _ => s
            .parse::<f64>()
            .map(|f| serde_json::json!(f))
            .map_err(|_| format!("unsupported filter literal {s}")),
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn eval<'a>(steps: &[Step], v: &'a Value) -> Vec<&'a Value> {
    let Some((first, rest)) = steps.split_first() else {
        return vec![v];
    };
    let next: Vec<&Value> = match first {
        Step::Field(f) => v.get(f).into_iter().collect(),
        Step::Index(i) => match v.as_array() {
            Some(a) => {
                let idx = if *i < 0 { a.len() as i64 + i } else { *i };
                usize::try_from(idx)
                    .ok()
                    .and_then(|u| a.get(u))
                    .into_iter()
                    .collect()
            }
            None => Vec::new(),
        },
        Step::All => match v {
            Value::Array(a) => a.iter().collect(),
            Value::Object(m) => m.values().collect(),
            _ => Vec::new(),
        },
        Step::Filter { path, op } => {
            let items: Vec<&Value> = match v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            items
                .into_iter()
                .filter(|item| {
                    let found = eval(path, item);
                    match op {
                        None => !found.is_empty(),
                        Some((eq, lit)) => {
                            let hit = found.iter().any(|f| same(f, lit));
                            if *eq { hit } else { !found.is_empty() && !hit }
                        }
                    }
                })
                .collect()
        }
    };
    next.into_iter().flat_map(|n| eval(rest, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_select_like_kubectl() {
        let o = json!({
            "metadata": {"labels": {"app.kubernetes.io/name": "x", "foo": "bar"}},
            "spec": {"x": [{"y": 1}, {"y": 2}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "Scheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}
        });
        let f = |p: &str| {
            JsonPath::parse(p)
                .unwrap()
                .find(&o)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(f(".status.phase"), vec![json!("Running")]);
        assert_eq!(f("{.spec.x[0].y}"), vec![json!(1)]);
        assert_eq!(f(".spec.x[-1].y"), vec![json!(2)]);
        assert_eq!(f(".spec.x[*].y"), vec![json!(1), json!(2)]);
        assert_eq!(f(".metadata.labels.foo"), vec![json!("bar")]);
        assert_eq!(
            f(".metadata.labels['app.kubernetes.io/name']"),
            vec![json!("x")]
        );
        assert_eq!(
            f(r".metadata.labels.app\.kubernetes\.io/name"),
            vec![json!("x")]
        );
        assert_eq!(
            f(r#".status.conditions[?(@.type=="Ready")].status"#),
            vec![json!("False")]
        );
        assert_eq!(
            f(".status.conditions[?(@.type!='Ready')].type"),
            vec![json!("Scheduled")]
        );
        assert!(f(".status.missing").is_empty());
        assert!(JsonPath::parse(".a[").is_err());
    }
}
