//! The guard in front of llama.cpp's GBNF parser, which recurses without a
//! limit (a stack overflow aborts the whole process): sizes, rule counts and
//! nesting are bounded before a grammar reaches it.

use crate::EngineError;

/// Largest GBNF source accepted (grammars generated from big schemas run to
/// tens of KiB).
const MAX_GBNF_BYTES: usize = 256 * 1024;
/// Deepest `(` nesting accepted: llama.cpp's parser recurses once per level.
const MAX_GBNF_NESTING: usize = 128;
/// Most rules accepted: llama.cpp's left-recursion check recurses once per rule
/// along a chain of references.
const MAX_GBNF_RULES: usize = 2048;

/// Refuses GBNF that would exhaust the stack of llama.cpp's recursive parser
/// (which has no limit of its own, and a stack overflow aborts the process).
/// Quoted strings and character classes are skipped, so brackets inside them
/// do not count.
pub fn check_shape(source: &str) -> Result<(), EngineError> {
    let refuse = |what: String| Err(EngineError::InvalidGrammar(what));
    if source.len() > MAX_GBNF_BYTES {
        return refuse(format!(
            "the GBNF grammar is {} bytes; the limit is {MAX_GBNF_BYTES}",
            source.len()
        ));
    }
    let rules = source.matches("::=").count();
    if rules > MAX_GBNF_RULES {
        return refuse(format!(
            "the GBNF grammar has {rules} rules; the limit is {MAX_GBNF_RULES}"
        ));
    }
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut chars = source.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '[' => {
                let close = if c == '"' { '"' } else { ']' };
                while let Some(inner) = chars.next() {
                    if inner == '\\' {
                        chars.next();
                    } else if inner == close {
                        break;
                    }
                }
            }
            '#' => {
                for inner in chars.by_ref() {
                    if inner == '\n' {
                        break;
                    }
                }
            }
            '(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_GBNF_NESTING {
        return refuse(format!(
            "the GBNF grammar nests parentheses {deepest} deep; the limit is {MAX_GBNF_NESTING}"
        ));
    }
    Ok(())
}
