//! Reply parsing: defensive, no indexing or unwrap on what Redis sent.

use redis::Value;

use crate::error::Error;
use crate::store::{GroupKey, Owner};

pub(super) fn uint(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub(super) fn uint32(v: &Value) -> Option<u32> {
    uint(v).and_then(|n| u32::try_from(n).ok())
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

pub(super) fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

pub(super) fn bad_reply(group: &GroupKey, call: &str, what: &str) -> Error {
    Error::CorruptState {
        group: group.name.clone(),
        detail: format!("unexpected reply from the {call} script: {what}"),
    }
}

/// Parses an owner record `"<token> <member>"` (member ids may contain spaces).
pub(super) fn parse_owner(record: &str) -> Option<Owner> {
    let (token, member) = record.split_once(' ')?;
    if token.is_empty() || !token.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(Owner {
        member: member.to_string(),
        token: token.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_records_parse_token_first() {
        assert_eq!(
            parse_owner("17 a b c"),
            Some(Owner {
                member: "a b c".into(),
                token: 17
            })
        );
        assert_eq!(parse_owner("x y"), None);
        assert_eq!(parse_owner("17"), None);
        assert_eq!(parse_owner(" 17 a"), None);
    }
}
