//! `aspen-cli txn`: etcdctl's interactive txn grammar, read from stdin.
//!
//! Three sections separated by a blank line: compares, then the operations run when every
//! compare holds (success), then those run otherwise (failure).
//!
//! ```text
//! value("config/mode") = "blue"
//! mod("config/mode") < "12"
//!
//! put config/mode green
//! get config/mode
//!
//! get config/mode
//! ```
//!
//! Compares: `TARGET("KEY") OP "VALUE"` with TARGET `value`/`val`, `version`/`ver`,
//! `create`/`c`, `mod`/`m`, OP one of `=`, `!=`, `<`, `>`; numbers for every target but value.
//! Operations: `put KEY VALUE`, `get KEY`, `del KEY` (`delete` too); words may be double-quoted
//! (`\"`, `\\`, `\n`, `\t` inside quotes).

use aspen::api::{Compare, CompareOp, CompareTarget, TxnOp};

/// A parsed txn: the compares and the two branches.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

/// Parses the three sections; an error names the line and what was expected.
pub fn parse(text: &str) -> Result<Txn, String> {
    let mut txn = Txn::default();
    // Each blank line ends a section (a leading one: no compares, as in etcdctl).
    let mut section = 0;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.trim();
        if line.is_empty() {
            section += 1;
            continue;
        }
        match section {
            0 => txn.compares.push(parse_compare(line).map_err(|e| format!("line {n}: {e}"))?),
            1 => txn.success.push(parse_request(line).map_err(|e| format!("line {n}: {e}"))?),
            2 => txn.failure.push(parse_request(line).map_err(|e| format!("line {n}: {e}"))?),
            _ => return Err(format!("line {n}: text after the failure section")),
        }
    }
    if txn.success.is_empty() && txn.failure.is_empty() && txn.compares.is_empty() {
        return Err(
            "empty txn: give compares, a blank line, success operations, a blank line, failure operations".into()
        );
    }
    Ok(txn)
}

fn parse_compare(line: &str) -> Result<Compare, String> {
    let open = line.find('(').ok_or("a compare looks like value(\"key\") = \"v\"")?;
    let target = line[..open].trim().to_ascii_lowercase();
    let rest = &line[open + 1..];
    let (key, rest) = quoted_or_word(rest.trim_start(), ')')?;
    let rest = rest.trim_start().strip_prefix(')').ok_or("missing ')' after the key")?.trim_start();
    let (op, rest) = if let Some(r) = rest.strip_prefix("!=") {
        (CompareOp::NotEqual, r)
    } else if let Some(r) = rest.strip_prefix('=') {
        (CompareOp::Equal, r)
    } else if let Some(r) = rest.strip_prefix('<') {
        (CompareOp::Less, r)
    } else if let Some(r) = rest.strip_prefix('>') {
        (CompareOp::Greater, r)
    } else {
        return Err("expected =, !=, < or > after the key".into());
    };
    if rest.trim().is_empty() {
        return Err("missing the value after the operator (write \"\" for an empty value)".into());
    }
    let (value, rest) = quoted_or_word(rest.trim_start(), ' ')?;
    if !rest.trim().is_empty() {
        return Err(format!("unexpected text after the compare: {:?}", rest.trim()));
    }
    let number = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{target} compares against a number, not {:?}", String::from_utf8_lossy(v)))
    };
    let target = match target.as_str() {
        "value" | "val" => CompareTarget::Value(value),
        "version" | "ver" => CompareTarget::Version(number(&value)?),
        "create" | "c" => CompareTarget::CreateRevision(number(&value)?),
        "mod" | "m" => CompareTarget::ModRevision(number(&value)?),
        "lease" => return Err("lease compares need leases, which Aspen does not have yet".into()),
        other => return Err(format!("unknown compare target {other:?} (value, version, create, mod)")),
    };
    if key.is_empty() {
        return Err("empty key".into());
    }
    Ok(Compare { key, op, target })
}

fn parse_request(line: &str) -> Result<TxnOp, String> {
    let words = split_words(line)?;
    let mut it = words.into_iter();
    let verb = it.next().map(|v| String::from_utf8_lossy(&v).to_ascii_lowercase()).unwrap_or_default();
    let args: Vec<Vec<u8>> = it.collect();
    match (verb.as_str(), args.as_slice()) {
        ("put", [key, value]) => Ok(TxnOp::put(key.clone(), value.clone())),
        ("get", [key]) => Ok(TxnOp::get(key.clone())),
        ("del" | "delete", [key]) => Ok(TxnOp::delete(key.clone())),
        ("put", _) => Err("put takes KEY VALUE".into()),
        ("get" | "del" | "delete", _) => Err(format!("{verb} takes one KEY")),
        _ => Err(format!("unknown operation {verb:?} (put, get, del)")),
    }
    .and_then(|op| if op.key().is_empty() { Err("empty key".into()) } else { Ok(op) })
}

/// One word: double-quoted (with `\"`, `\\` escapes) or up to whitespace or `stop`.
fn quoted_or_word(s: &str, stop: char) -> Result<(Vec<u8>, &str), String> {
    if let Some(body) = s.strip_prefix('"') {
        let mut out = Vec::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Ok((out, &body[i + 1..])),
                '\\' => match chars.next() {
                    Some((_, e @ ('"' | '\\'))) => out.push(e as u8),
                    Some((_, 'n')) => out.push(b'\n'),
                    Some((_, 't')) => out.push(b'\t'),
                    Some((_, e)) => return Err(format!("unknown escape \\{e}")),
                    None => return Err("unterminated quote".into()),
                },
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        Err("unterminated quote".into())
    } else {
        let end = s.find(|c: char| c.is_whitespace() || c == stop).unwrap_or(s.len());
        Ok((s.as_bytes()[..end].to_vec(), &s[end..]))
    }
}

fn split_words(line: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut words = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let (word, after) = quoted_or_word(rest, ' ')?;
        words.push(word);
        rest = after.trim_start();
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcdctls_three_sections() {
        let txn = parse(
            "value(\"config/mode\") = \"blue\"\nmod(\"config/mode\") < \"12\"\n\nput config/mode green\nget \
             config/mode\n\nput \"odd key\" \"a \\\"quoted\\\" value\"\ndel x\n",
        )
        .unwrap();
        assert_eq!(
            txn.compares,
            vec![
                Compare::value("config/mode", CompareOp::Equal, "blue"),
                Compare::mod_revision("config/mode", CompareOp::Less, 12),
            ]
        );
        assert_eq!(txn.success, vec![TxnOp::put("config/mode", "green"), TxnOp::get("config/mode"),]);
        assert_eq!(txn.failure, vec![TxnOp::put("odd key", "a \"quoted\" value"), TxnOp::delete("x"),]);
    }

    #[test]
    fn sections_may_be_empty_and_aliases_work() {
        let txn = parse("ver(\"k\") != \"0\"\nc(\"k\") > \"3\"\n\n\nget k\n").unwrap();
        assert_eq!(txn.compares.len(), 2);
        assert_eq!(txn.compares[0], Compare::version("k", CompareOp::NotEqual, 0));
        assert_eq!(txn.compares[1], Compare::create_revision("k", CompareOp::Greater, 3));
        assert!(txn.success.is_empty());
        assert_eq!(txn.failure, vec![TxnOp::get("k")]);
        // No compares: the success operations always run.
        let txn = parse("\nput a 1\n").unwrap();
        assert!(txn.compares.is_empty());
        assert_eq!(txn.success.len(), 1);
    }

    #[test]
    fn mistakes_name_the_line() {
        for (text, want) in [
            ("value(\"k\") ~ \"v\"\n", "line 1: expected ="),
            ("version(\"k\") = \"x\"\n", "line 1: version compares against a number"),
            ("size(\"k\") = \"1\"\n", "line 1: unknown compare target"),
            ("\nput k\n", "line 2: put takes KEY VALUE"),
            ("\nfrob k\n", "line 2: unknown operation"),
            ("\nget \"k\n", "line 2: unterminated quote"),
            ("\n\n", "empty txn"),
            ("lease(\"k\") = \"1\"\n", "need leases"),
            ("value(\"k\") =\n", "line 1: missing the value"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
