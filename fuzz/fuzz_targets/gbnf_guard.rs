//! The guard in front of llama.cpp's recursive GBNF parser: linear in the
//! grammar's length and never a panic; what it accepts stays within the
//! bounds that parser's stack survives (checked here by an independent count
//! of unquoted parentheses).
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The deepest nesting of `(` outside strings, character classes and comments,
/// counted the slow way: a recursive walk that tracks its own depth.
fn depth(source: &[char]) -> usize {
    fn walk(s: &[char], i: &mut usize, level: usize) -> usize {
        let mut deepest = level;
        while *i < s.len() {
            let c = s[*i];
            *i += 1;
            match c {
                '"' | '[' => {
                    let close = if c == '"' { '"' } else { ']' };
                    while *i < s.len() {
                        let inner = s[*i];
                        *i += 1;
                        if inner == '\\' {
                            *i += 1;
                        } else if inner == close {
                            break;
                        }
                    }
                }
                '#' => {
                    while *i < s.len() && s[*i] != '\n' {
                        *i += 1;
                    }
                }
                '(' => deepest = deepest.max(walk(s, i, level + 1)),
                ')' if level > 0 => return deepest,
                _ => {}
            }
        }
        deepest
    }
    walk(source, &mut 0, 0)
}

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    if engine::gbnf::check_shape(source).is_ok() {
        let chars: Vec<char> = source.chars().collect();
        assert!(
            depth(&chars) <= 128,
            "accepted a grammar nested deeper than 128"
        );
        assert!(source.matches("::=").count() <= 2048);
    }
});
