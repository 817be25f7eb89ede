//! Parser and canonical printer of the annotation language.
//!
//! [`parse_annotation`] turns text such as `b l k+, n k+ -> b l n` into an
//! [`Annotation`] and checks the rules that need the whole annotation (an
//! output identifier must appear in an input, one mark per identifier, `*` in
//! an output only when an input has one). Every error carries the 1-based
//! line and column (in chars) of the offending token and says what was
//! expected. The `Display` impls of the syntax tree print the canonical form,
//! which parses back to the same tree. This module knows nothing about shapes
//! or layouts: binding and partition rules live in `bind` and `rule`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::ast::{Annotation, Dim, Factor, Mark, Shape};

/// A syntax or semantic error in an annotation, at a 1-based line and column
/// (counted in chars).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{line}:{col}: expected {expected}, found {found}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    /// What the parser would have accepted here, e.g. `a dimension, ',' or '->'`.
    pub expected: String,
    /// What it found, quoted (`'-'`), or `end of input`.
    pub found: String,
}

/// Parses one annotation, e.g. `b l k+, n k+ -> b l n`.
pub fn parse_annotation(src: &str) -> Result<Annotation, ParseError> {
    let tokens = lex(src);
    let mut parser = Parser {
        tokens,
        pos: 0,
        occurrences: Vec::new(),
    };
    let inputs = parser.shapes(Side::Input)?;
    parser.bump(); // the arrow: `shapes(Side::Input)` only returns in front of one
    let outputs = parser.shapes(Side::Output)?;
    check(&parser.occurrences)?;
    Ok(Annotation { inputs, outputs })
}

impl FromStr for Annotation {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_annotation(s)
    }
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// A run of `[A-Za-z0-9_]`, with the mark that follows it without space.
    Word {
        text: String,
        mark: Option<char>,
    },
    Star,
    Question,
    LParen,
    RParen,
    Comma,
    Arrow,
    /// Any other char, including a `^` or `+` that does not follow a word.
    Other(char),
    End,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
    col: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn lex(src: &str) -> Vec<Token> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let (mut line, mut col) = (1, 1);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let (start_line, start_col) = (line, col);
        let mut advance = 1;
        let tok = match c {
            '\n' => {
                line += 1;
                col = 1;
                i += 1;
                continue;
            }
            c if c.is_whitespace() => None,
            '*' => Some(Tok::Star),
            '?' => Some(Tok::Question),
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            ',' => Some(Tok::Comma),
            '-' if chars.get(i + 1) == Some(&'>') => {
                advance = 2;
                Some(Tok::Arrow)
            }
            c if is_word_char(c) => {
                let end = chars[i..]
                    .iter()
                    .position(|&c| !is_word_char(c))
                    .map_or(chars.len(), |n| i + n);
                let text: String = chars[i..end].iter().collect();
                let mark = match chars.get(end) {
                    Some(&m @ ('^' | '+')) => Some(m),
                    _ => None,
                };
                advance = end - i + usize::from(mark.is_some());
                Some(Tok::Word { text, mark })
            }
            c => Some(Tok::Other(c)),
        };
        if let Some(tok) = tok {
            tokens.push(Token {
                tok,
                line: start_line,
                col: start_col,
            });
        }
        i += advance;
        col += advance;
    }
    tokens.push(Token {
        tok: Tok::End,
        line,
        col,
    });
    tokens
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Word { text, mark } => match mark {
            Some(m) => format!("'{text}{m}'"),
            None => format!("'{text}'"),
        },
        Tok::Star => "'*'".into(),
        Tok::Question => "'?'".into(),
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::Comma => "','".into(),
        Tok::Arrow => "'->'".into(),
        Tok::Other(c) => format!("'{c}'"),
        Tok::End => "end of input".into(),
    }
}

// ---------------------------------------------------------------------------
// Parser

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Input,
    Output,
}

impl Side {
    fn terminator(self) -> (&'static Tok, &'static str) {
        match self {
            Side::Input => (&Tok::Arrow, "'->'"),
            Side::Output => (&Tok::End, "end of input"),
        }
    }
}

/// Where an identifier or `*` was written, for the whole-annotation checks.
#[derive(Clone, Debug)]
struct Occurrence {
    /// `None` for `*`.
    named: Option<(String, Mark)>,
    side: Side,
    line: usize,
    col: usize,
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    occurrences: Vec<Occurrence>,
}

impl Parser {
    fn peek(&self) -> &Token {
        // `lex` always ends the list with `End`, and `bump` never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn bump(&mut self) {
        if self.pos + 1 < self.tokens.len() {
            self.pos += 1;
        }
    }

    fn error_here(&self, expected: impl Into<String>) -> ParseError {
        let t = self.peek();
        ParseError {
            line: t.line,
            col: t.col,
            expected: expected.into(),
            found: describe(&t.tok),
        }
    }

    /// A comma-separated list of shapes, possibly empty, up to the side's
    /// terminator (`->` for inputs, the end for outputs), which is not consumed.
    fn shapes(&mut self, side: Side) -> Result<Vec<Shape>, ParseError> {
        let (term, term_name) = side.terminator();
        let mut shapes = Vec::new();
        if &self.peek().tok == term {
            return Ok(shapes);
        }
        loop {
            let first = shapes.is_empty();
            let dims = self.dims(side)?;
            if dims.is_empty() {
                return Err(if first {
                    self.error_here(format!("a dimension or {term_name}"))
                } else {
                    self.error_here("a dimension")
                });
            }
            let shape = match dims.as_slice() {
                [Dim::Single(Factor::Anon)] => Shape::Opaque,
                _ => Shape::Tensor(dims),
            };
            shapes.push(shape);
            match &self.peek().tok {
                Tok::Comma => self.bump(),
                t if t == term => return Ok(shapes),
                _ => return Err(self.error_here(format!("a dimension, ',' or {term_name}"))),
            }
        }
    }

    /// The dims of one shape: as many as follow.
    fn dims(&mut self, side: Side) -> Result<Vec<Dim>, ParseError> {
        let mut dims = Vec::new();
        loop {
            let t = self.peek().clone();
            let dim = match &t.tok {
                Tok::Word { .. } | Tok::Question => Dim::Single(self.factor(side)?),
                Tok::Star => {
                    self.occurrences.push(Occurrence {
                        named: None,
                        side,
                        line: t.line,
                        col: t.col,
                    });
                    self.bump();
                    Dim::Star
                }
                Tok::LParen => {
                    self.bump();
                    let mut factors = Vec::new();
                    loop {
                        match &self.peek().tok {
                            Tok::Word { .. } | Tok::Question => factors.push(self.factor(side)?),
                            Tok::RParen if !factors.is_empty() => {
                                self.bump();
                                break;
                            }
                            Tok::RParen | Tok::Star | Tok::LParen => {
                                return Err(
                                    self.error_here("a factor (an identifier, a number or '?')")
                                );
                            }
                            _ => return Err(self.error_here("a factor or ')'")),
                        }
                    }
                    Dim::Group(factors)
                }
                _ => return Ok(dims),
            };
            dims.push(dim);
        }
    }

    /// One factor: an identifier with its mark, a number or `?`.
    fn factor(&mut self, side: Side) -> Result<Factor, ParseError> {
        let t = self.peek().clone();
        let factor = match &t.tok {
            Tok::Question => Factor::Anon,
            Tok::Word { text, mark } => {
                let starts_with_digit = text.starts_with(|c: char| c.is_ascii_digit());
                if starts_with_digit {
                    if !text.chars().all(|c| c.is_ascii_digit()) {
                        return Err(self.error_here("an identifier or a number"));
                    }
                    if *mark == Some('+') {
                        return Err(self.error_here("a number without '+' (numbers are frozen)"));
                    }
                    match text.parse::<u64>() {
                        Ok(n) => Factor::Number(n),
                        Err(_) => return Err(self.error_here("a number below 2^64")),
                    }
                } else {
                    let mark = match mark {
                        Some('+') => Mark::Reduce,
                        Some(_) => Mark::Frozen,
                        None => Mark::Spatial,
                    };
                    self.occurrences.push(Occurrence {
                        named: Some((text.clone(), mark)),
                        side,
                        line: t.line,
                        col: t.col,
                    });
                    Factor::Named {
                        name: text.clone(),
                        mark,
                    }
                }
            }
            _ => return Err(self.error_here("a factor (an identifier, a number or '?')")),
        };
        self.bump();
        Ok(factor)
    }
}

/// The rules that need the whole annotation.
fn check(occurrences: &[Occurrence]) -> Result<(), ParseError> {
    let mut first: BTreeMap<&str, &Occurrence> = BTreeMap::new();
    let input_has_star = occurrences
        .iter()
        .any(|o| o.side == Side::Input && o.named.is_none());
    for occ in occurrences {
        let Some((name, mark)) = &occ.named else {
            if occ.side == Side::Output && !input_has_star {
                return Err(ParseError {
                    line: occ.line,
                    col: occ.col,
                    expected: "a dimension that an input names".into(),
                    found: "'*', which no input has".into(),
                });
            }
            continue;
        };
        match first.get(name.as_str()) {
            Some(prev) => {
                let Some((_, prev_mark)) = &prev.named else {
                    continue;
                };
                if prev_mark != mark {
                    return Err(ParseError {
                        line: occ.line,
                        col: occ.col,
                        expected: format!(
                            "'{}' like at {}:{}",
                            named_str(name, *prev_mark),
                            prev.line,
                            prev.col
                        ),
                        found: format!("'{}'", named_str(name, *mark)),
                    });
                }
            }
            None => {
                if occ.side == Side::Output {
                    return Err(ParseError {
                        line: occ.line,
                        col: occ.col,
                        expected: "an identifier that an input names, or a number".into(),
                        found: format!("'{}'", named_str(name, *mark)),
                    });
                }
                first.insert(name, occ);
            }
        }
    }
    Ok(())
}

fn named_str(name: &str, mark: Mark) -> String {
    format!("{name}{mark}")
}

// ---------------------------------------------------------------------------
// Canonical printer

impl fmt::Display for Mark {
    /// The suffix written after an identifier: nothing, `+` or `^`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mark::Spatial => "",
            Mark::Reduce => "+",
            Mark::Frozen => "^",
        })
    }
}

impl fmt::Display for Factor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Factor::Named { name, mark } => write!(f, "{name}{mark}"),
            Factor::Number(n) => write!(f, "{n}"),
            Factor::Anon => f.write_str("?"),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Single(factor) => write!(f, "{factor}"),
            Dim::Group(factors) => {
                f.write_str("(")?;
                write_joined(f, factors, " ")?;
                f.write_str(")")
            }
            Dim::Star => f.write_str("*"),
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Tensor(dims) => write_joined(f, dims, " "),
            Shape::Opaque => f.write_str("?"),
        }
    }
}

impl fmt::Display for Annotation {
    /// The canonical form: `b l k+, n k+ -> b l n`, `-> x` without inputs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_joined(f, &self.inputs, ", ")?;
        if !self.inputs.is_empty() {
            f.write_str(" ")?;
        }
        f.write_str("->")?;
        if !self.outputs.is_empty() {
            f.write_str(" ")?;
        }
        write_joined(f, &self.outputs, ", ")
    }
}

fn write_joined<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    items: &[T],
    sep: &str,
) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::anno::testgen;

    fn err(src: &str) -> String {
        match parse_annotation(src) {
            Ok(a) => panic!("{src:?} parsed as {a}"),
            Err(e) => e.to_string(),
        }
    }

    fn named(name: &str, mark: Mark) -> Factor {
        Factor::Named {
            name: name.into(),
            mark,
        }
    }

    #[test]
    fn parses_every_construct() {
        let a = parse_annotation("* k+, ?, n (g r^) 64 ? -> * n").unwrap();
        assert_eq!(
            a,
            Annotation {
                inputs: vec![
                    Shape::Tensor(vec![Dim::Star, Dim::Single(named("k", Mark::Reduce))]),
                    Shape::Opaque,
                    Shape::Tensor(vec![
                        Dim::Single(named("n", Mark::Spatial)),
                        Dim::Group(vec![named("g", Mark::Spatial), named("r", Mark::Frozen)]),
                        Dim::Single(Factor::Number(64)),
                        Dim::Single(Factor::Anon),
                    ]),
                ],
                outputs: vec![Shape::Tensor(vec![
                    Dim::Star,
                    Dim::Single(named("n", Mark::Spatial)),
                ])],
            }
        );
        assert_eq!(a.to_string(), "* k+, ?, n (g r^) 64 ? -> * n");
    }

    #[test]
    fn whitespace_and_newlines_are_free() {
        let a: Annotation = "  b  l\n k+ ,n k+\t->\n b l n ".parse().unwrap();
        assert_eq!(a.to_string(), "b l k+, n k+ -> b l n");
        let a: Annotation = "b(h d)->b h d".parse().unwrap();
        assert_eq!(a.to_string(), "b (h d) -> b h d");
    }

    #[test]
    fn empty_lists_and_scalar_output() {
        assert_eq!(parse_annotation("-> 1").unwrap().to_string(), "-> 1");
        assert_eq!(parse_annotation("->").unwrap().to_string(), "->");
        assert_eq!(parse_annotation("b ->").unwrap().to_string(), "b ->");
        let a = parse_annotation("b+ l+ -> 1").unwrap();
        assert_eq!(
            a.outputs,
            vec![Shape::Tensor(vec![Dim::Single(Factor::Number(1))])]
        );
    }

    #[test]
    fn a_lone_question_mark_is_opaque() {
        let a = parse_annotation("?, b ? -> b, ?").unwrap();
        assert_eq!(a.inputs[0], Shape::Opaque);
        assert_eq!(
            a.inputs[1],
            Shape::Tensor(vec![
                Dim::Single(named("b", Mark::Spatial)),
                Dim::Single(Factor::Anon)
            ])
        );
        assert_eq!(a.outputs[1], Shape::Opaque);
    }

    #[test]
    fn frozen_mark_on_a_number_is_redundant() {
        assert_eq!(
            parse_annotation("b 1^ -> b").unwrap().to_string(),
            "b 1 -> b"
        );
    }

    #[test]
    fn later_group_factors_may_carry_any_mark() {
        // Later factors are never split; that is a partition rule, not syntax.
        let a = parse_annotation("b (h d+) -> b").unwrap();
        assert_eq!(a.to_string(), "b (h d+) -> b");
    }

    #[test]
    fn syntax_errors_say_where_and_what() {
        let cases = [
            (
                "b l k+, n k+ - b l n",
                "1:14: expected a dimension, ',' or '->', found '-'",
            ),
            ("b l, , n -> b", "1:6: expected a dimension, found ','"),
            ("b l, -> b", "1:6: expected a dimension, found '->'"),
            (
                "b l -> b,",
                "1:10: expected a dimension, found end of input",
            ),
            (", b -> b", "1:1: expected a dimension or '->', found ','"),
            ("", "1:1: expected a dimension or '->', found end of input"),
            (
                "a b",
                "1:4: expected a dimension, ',' or '->', found end of input",
            ),
            (
                "b -> b )",
                "1:8: expected a dimension, ',' or end of input, found ')'",
            ),
            (
                "b 2x -> b",
                "1:3: expected an identifier or a number, found '2x'",
            ),
            (
                "b 1+ -> b",
                "1:3: expected a number without '+' (numbers are frozen), found '1+'",
            ),
            (
                "b 99999999999999999999 -> b",
                "1:3: expected a number below 2^64, found '99999999999999999999'",
            ),
            (
                "b () -> b",
                "1:4: expected a factor (an identifier, a number or '?'), found ')'",
            ),
            (
                "b (h *) -> b",
                "1:6: expected a factor (an identifier, a number or '?'), found '*'",
            ),
            ("b (h d -> b", "1:8: expected a factor or ')', found '->'"),
            (
                "b +k -> b",
                "1:3: expected a dimension, ',' or '->', found '+'",
            ),
            (
                "b k^^ -> b",
                "1:5: expected a dimension, ',' or '->', found '^'",
            ),
            (
                "* ?+ -> b",
                "1:4: expected a dimension, ',' or '->', found '+'",
            ),
            (
                "b\n  l$ -> b",
                "2:4: expected a dimension, ',' or '->', found '$'",
            ),
            (
                "b -> b -> b",
                "1:8: expected a dimension, ',' or end of input, found '->'",
            ),
        ];
        for (src, expected) in cases {
            assert_eq!(err(src), expected, "for {src:?}");
        }
    }

    #[test]
    fn semantic_errors_say_where_and_what() {
        let cases = [
            (
                "b k+, k^ -> b",
                "1:7: expected 'k+' like at 1:3, found 'k^'",
            ),
            ("b k+ -> b k", "1:11: expected 'k+' like at 1:3, found 'k'"),
            (
                "b (h d) -> b h^ d",
                "1:14: expected 'h' like at 1:4, found 'h^'",
            ),
            (
                "b -> c",
                "1:6: expected an identifier that an input names, or a number, found 'c'",
            ),
            (
                "-> b",
                "1:4: expected an identifier that an input names, or a number, found 'b'",
            ),
            (
                "b\n-> b (x 2)",
                "2:7: expected an identifier that an input names, or a number, found 'x'",
            ),
            (
                "b -> b *",
                "1:8: expected a dimension that an input names, found '*', which no input has",
            ),
        ];
        for (src, expected) in cases {
            assert_eq!(err(src), expected, "for {src:?}");
        }
    }

    #[test]
    fn parse_error_fields() {
        let e = parse_annotation("b l, , n -> b").unwrap_err();
        assert_eq!((e.line, e.col), (1, 6));
        assert_eq!(e.expected, "a dimension");
        assert_eq!(e.found, "','");
    }

    proptest! {
        #[test]
        fn print_then_parse_round_trips(a in testgen::annotation()) {
            let printed = a.to_string();
            let parsed = parse_annotation(&printed);
            prop_assert_eq!(parsed.as_ref(), Ok(&a), "printed as {:?}", printed);
            prop_assert_eq!(parsed.map(|p| p.to_string()), Ok(printed));
        }

        #[test]
        fn arbitrary_text_never_panics(src in "[a-c0-9 ,()*?^+>\\-\n]{0,24}") {
            if let Err(e) = parse_annotation(&src) {
                prop_assert!(e.line >= 1 && e.col >= 1);
                prop_assert!(!e.expected.is_empty() && !e.found.is_empty());
            }
        }

        #[test]
        fn printed_parses_are_canonical(src in "[a-c ,()*?^+]{0,12} -> [a-c ,()1]{0,8}") {
            if let Ok(a) = parse_annotation(&src) {
                let printed = a.to_string();
                prop_assert_eq!(parse_annotation(&printed), Ok(a));
            }
        }
    }
}
