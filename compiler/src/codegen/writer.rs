//! The text of generated files: an indenting writer, and the layout of the
//! few expression shapes codegen emits (calls, closures as last arguments,
//! `let` right-hand sides, packed arrays) as rustfmt lays them out under its
//! default settings (edition 2024, max width 100), so that generated files
//! are rustfmt-clean without running rustfmt.
//!
//! The rules follow rustfmt's `overflow` and `assign` modules: a call's
//! arguments go on one line when they fit the line and rustfmt's
//! `fn_call_width` (60); otherwise a closure, or the single argument when it
//! is itself a call, may overflow (its first line after the other arguments,
//! the rest below); otherwise one argument per line. A `let` (or struct
//! field) right-hand side that does not fit on one line is tried on the
//! next line and kept there when that reads better by rustfmt's measure
//! (`prefer_next_line`).

/// rustfmt's `max_width`.
pub const MAX_WIDTH: usize = 100;
/// rustfmt's `fn_call_width` and `array_width` (60% of `max_width`).
const CALL_WIDTH: usize = 60;
/// rustfmt's `tab_spaces`.
const TAB: usize = 4;

/// Writes lines at an indentation level: `open` a block (`head {`), write
/// its lines, `close` it.
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
    level: usize,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current indentation in columns.
    pub fn indent(&self) -> usize {
        self.level * TAB
    }

    /// One line at the current indentation (an empty `text`: a blank line).
    pub fn line(&mut self, text: impl AsRef<str>) {
        let text = text.as_ref();
        if !text.is_empty() {
            self.out.extend(std::iter::repeat_n(' ', self.indent()));
            self.out.push_str(text);
        }
        self.out.push('\n');
    }

    /// Each line of `text` at the current indentation (relative indentation
    /// kept, blank lines left empty).
    pub fn lines(&mut self, text: &str) {
        for l in text.lines() {
            self.line(l);
        }
    }

    pub fn blank(&mut self) {
        self.out.push('\n');
    }

    /// `head {` and one level deeper.
    pub fn open(&mut self, head: impl AsRef<str>) {
        let head = head.as_ref();
        if head.is_empty() {
            self.line("{");
        } else {
            self.line(format!("{head} {{"));
        }
        self.level += 1;
    }

    /// One level up and `}`.
    pub fn close(&mut self) {
        self.close_with("");
    }

    /// One level up and `}` followed by `tail` (`}` `,`, `})?;`).
    pub fn close_with(&mut self, tail: &str) {
        self.level = self.level.saturating_sub(1);
        self.line(format!("}}{tail}"));
    }

    /// A statement laid out at the current indentation.
    pub fn stmt(&mut self, stmt: &Stmt) {
        let indent = self.indent();
        for l in stmt.render(indent) {
            if l.is_empty() {
                self.out.push('\n');
            } else {
                self.out.push_str(&l);
                self.out.push('\n');
            }
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// An expression of generated code, for layout.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// Text that stays on one line (a name, a literal, a short path).
    Atom(String),
    /// `callee(args)` (or `callee![args]`), then `tries` question marks.
    Call {
        callee: String,
        /// `tape.segment`: a method call on a short receiver (rustfmt
        /// overflows a lone method-call argument without the nested-call
        /// budget).
        method: bool,
        square: bool,
        args: Vec<Expr>,
        tries: usize,
    },
    /// `head { body }`, a closure with a block body (`move |t|`).
    Closure { head: String, body: Vec<Stmt> },
    /// `prefix[items]` of short items, packed several a line when they do
    /// not fit on one (`&[1, 2, 3]`).
    Array { prefix: String, items: Vec<String> },
}

impl Expr {
    pub fn atom(s: impl Into<String>) -> Self {
        Expr::Atom(s.into())
    }

    /// A path call `callee(args)`.
    pub fn call(callee: impl Into<String>, args: Vec<Expr>) -> Self {
        Expr::Call {
            callee: callee.into(),
            method: false,
            square: false,
            args,
            tries: 0,
        }
    }

    /// A method call on a receiver of at most four characters
    /// (`tape.adapt(..)`, `w.index(..)`).
    pub fn method(callee: impl Into<String>, args: Vec<Expr>) -> Self {
        Expr::Call {
            callee: callee.into(),
            method: true,
            square: false,
            args,
            tries: 0,
        }
    }

    /// A macro with square brackets (`vec![..]`).
    pub fn square(callee: impl Into<String>, args: Vec<Expr>) -> Self {
        Expr::Call {
            callee: callee.into(),
            method: false,
            square: true,
            args,
            tries: 0,
        }
    }

    /// The expression followed by `?`.
    pub fn try_(mut self) -> Self {
        if let Expr::Call { tries, .. } = &mut self {
            *tries += 1;
            self
        } else {
            match self {
                Expr::Atom(s) => Expr::Atom(format!("{s}?")),
                other => other,
            }
        }
    }

    /// Laid out in `shape`: the first line (without the columns before
    /// `shape.offset`), then whole lines with their indentation.
    fn rewrite(&self, shape: Shape) -> Vec<String> {
        match self {
            Expr::Atom(s) => vec![s.clone()],
            Expr::Closure { head, body } => {
                let mut out = vec![format!("{head} {{")];
                for stmt in body {
                    out.extend(stmt.render(shape.indent + TAB));
                }
                out.push(format!("{}}}", spaces(shape.indent)));
                out
            }
            Expr::Array { prefix, items } => {
                let one = format!("{prefix}{}]", items.join(", "));
                let inner = items.join(", ").len();
                if inner <= CALL_WIDTH.min(shape.width.saturating_sub(prefix.len() + 1))
                    && one.len() <= shape.width
                {
                    return vec![one];
                }
                // Mixed: as many items a line as fit, trailing comma; one a
                // line when an item is longer than rustfmt's
                // `short_array_element_width_threshold` (10).
                let nested = shape.indent + TAB;
                let mut out = vec![prefix.clone()];
                if items.iter().any(|i| i.len() > 10) {
                    for item in items {
                        out.push(format!("{}{item},", spaces(nested)));
                    }
                    out.push(format!("{}]", spaces(shape.indent)));
                    return out;
                }
                let mut cur = String::new();
                for item in items {
                    let add = if cur.is_empty() {
                        item.len() + 1
                    } else {
                        item.len() + 2
                    };
                    if !cur.is_empty() && nested + cur.len() + add > MAX_WIDTH {
                        out.push(format!("{}{cur}", spaces(nested)));
                        cur.clear();
                    }
                    if !cur.is_empty() {
                        cur.push(' ');
                    }
                    cur.push_str(item);
                    cur.push(',');
                }
                if !cur.is_empty() {
                    out.push(format!("{}{cur}", spaces(nested)));
                }
                out.push(format!("{}]", spaces(shape.indent)));
                out
            }
            Expr::Call {
                callee,
                method,
                square,
                args,
                tries,
            } => rewrite_call(callee, *method, *square, args, *tries, shape),
        }
    }

    /// rustfmt's `can_be_overflowed` for the last of `n` arguments.
    fn can_overflow(&self, n: usize) -> bool {
        match self {
            Expr::Closure { .. } => true,
            Expr::Call { .. } => n == 1,
            _ => false,
        }
    }

    /// rustfmt's `is_nested_call`: a path call or macro, not a method call.
    fn is_nested_call(&self) -> bool {
        matches!(self, Expr::Call { method: false, .. })
    }
}

/// Where an expression goes: `indent` is the block indentation (what a
/// closure body or a vertical argument list indents from), `offset` the
/// column the expression starts at, `width` the columns it may take on its
/// first line (what follows it on the line already subtracted).
#[derive(Clone, Copy, Debug)]
struct Shape {
    indent: usize,
    offset: usize,
    width: usize,
}

impl Shape {
    fn block(indent: usize, suffix: usize) -> Self {
        Shape {
            indent,
            offset: indent,
            width: MAX_WIDTH.saturating_sub(indent + suffix),
        }
    }

    fn offset_left(self, n: usize) -> Self {
        Shape {
            offset: self.offset + n,
            width: self.width.saturating_sub(n),
            ..self
        }
    }

    fn sub_width(self, n: usize) -> Self {
        Shape {
            width: self.width.saturating_sub(n),
            ..self
        }
    }
}

fn spaces(n: usize) -> String {
    " ".repeat(n)
}

fn rewrite_call(
    callee: &str,
    method: bool,
    square: bool,
    args: &[Expr],
    tries: usize,
    shape: Shape,
) -> Vec<String> {
    // A method call on a receiver is a chain. rustfmt folds a receiver no
    // longer than the room left in the first tab stop into the call
    // (`tape.segment(..)` at the start of a line); otherwise it formats the
    // chain, whose last call gets less room (the `?`s counted thrice) and
    // which breaks before the `.` when the call would take two to four lines.
    if let Some((receiver, name)) = callee.split_once('.').filter(|_| method)
        && shape.offset.saturating_sub(shape.indent) + receiver.len() > TAB
    {
        let inner = shape.offset_left(receiver.len()).sub_width(2 * tries);
        let rw = rewrite_call(&format!(".{name}"), false, square, args, tries, inner);
        if rw.len() == 1 || rw.len() >= 5 {
            let mut out = rw;
            out[0].insert_str(0, receiver);
            return out;
        }
        let reserved = MAX_WIDTH.saturating_sub(shape.offset + shape.width);
        let child = Shape::block(shape.indent + TAB, reserved);
        let rw = rewrite_call(&format!(".{name}"), false, square, args, tries, child);
        let mut out = vec![receiver.to_string()];
        out.push(format!("{}{}", spaces(child.indent), rw[0]));
        out.extend(rw[1..].iter().cloned());
        return out;
    }
    let (open, close) = if square { ("[", "]") } else { ("(", ")") };
    let q = "?".repeat(tries);
    let shape = shape.sub_width(tries);
    let one_line_width = shape.width.saturating_sub(callee.len() + 2);
    let one_line_shape = Shape {
        indent: shape.indent,
        offset: shape.offset + callee.len() + 1,
        width: one_line_width,
    };
    // Vertical items: one block level in, a comma after each.
    let nested = Shape::block(shape.indent + TAB, 1);
    if args.is_empty() {
        return vec![format!("{callee}{open}{close}{q}")];
    }
    let n = args.len();
    let items: Vec<Vec<String>> = args.iter().map(|a| a.rewrite(nested)).collect();
    let single = |lines: &Vec<String>| lines.len() == 1;

    // The last argument overflows: its first line after the others.
    let last = &args[n - 1];
    if last.can_overflow(n) && items[..n - 1].iter().all(single) {
        let before: usize = items[..n - 1].iter().map(|l| l[0].len() + 2).sum();
        let last_shape = if n == 1 && !last.is_nested_call() {
            one_line_shape
        } else {
            Shape {
                width: CALL_WIDTH.min(one_line_shape.width),
                ..one_line_shape
            }
            .offset_left(before)
        };
        let overflowed = last.rewrite(last_shape);
        let total = before + overflowed[0].len();
        if total <= CALL_WIDTH.min(one_line_width) {
            let mut first = format!("{callee}{open}");
            for l in &items[..n - 1] {
                first.push_str(&l[0]);
                first.push_str(", ");
            }
            first.push_str(&overflowed[0]);
            let mut out = vec![first];
            out.extend(overflowed[1..].iter().cloned());
            let end = out.last_mut().expect("a line");
            end.push_str(close);
            end.push_str(&q);
            return out;
        }
    }

    // One line.
    let horizontal = if n == 1 {
        single(&items[0]) && items[0][0].len() <= one_line_width
    } else {
        let total: usize = items.iter().map(|l| l[0].len()).sum::<usize>() + 2 * (n - 1);
        items.iter().all(single) && total <= CALL_WIDTH.min(one_line_width)
    };
    if horizontal {
        let inner: Vec<&str> = items.iter().map(|l| l[0].as_str()).collect();
        return vec![format!("{callee}{open}{}{close}{q}", inner.join(", "))];
    }

    // One argument a line.
    let mut out = vec![format!("{callee}{open}")];
    for lines in items {
        let k = out.len();
        out.push(format!("{}{}", spaces(nested.indent), lines[0]));
        out.extend(lines[1..].iter().cloned());
        let _ = k;
        out.last_mut().expect("a line").push(',');
    }
    out.push(format!("{}{close}{q}", spaces(shape.indent)));
    out
}

/// A statement of generated code, for layout.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// `// text`.
    Comment(String),
    /// `lhs rhs` and `suffix`: `let x = rhs;`, `x = rhs;`, a struct field
    /// `name: rhs,` (`lhs` ends with `=` or `:`).
    Assign {
        lhs: String,
        rhs: Expr,
        suffix: &'static str,
    },
    /// A struct literal field `name: value,`: rustfmt keeps the value on
    /// the field's line unless it cannot lay it out there.
    Field { name: String, value: Expr },
    /// An expression (the block's value, or with `;`).
    Expr(Expr, &'static str),
}

impl Stmt {
    pub fn comment(text: impl Into<String>) -> Self {
        Stmt::Comment(text.into())
    }

    /// `let pat = rhs;`.
    pub fn let_(pat: &str, rhs: Expr) -> Self {
        Stmt::Assign {
            lhs: format!("let {pat} ="),
            rhs,
            suffix: ";",
        }
    }

    /// `place = rhs;`.
    pub fn assign(place: &str, rhs: Expr) -> Self {
        Stmt::Assign {
            lhs: format!("{place} ="),
            rhs,
            suffix: ";",
        }
    }

    /// A struct literal field `name: rhs,`.
    pub fn field(name: &str, value: Expr) -> Self {
        Stmt::Field {
            name: name.to_string(),
            value,
        }
    }

    /// The lines of the statement at `indent`, with their indentation.
    fn render(&self, indent: usize) -> Vec<String> {
        let pad = spaces(indent);
        match self {
            Stmt::Comment(text) => vec![format!("{pad}// {text}")],
            Stmt::Field { name, value } => {
                let shape = Shape::block(indent, 1).offset_left(name.len() + 2);
                let mut lines = value.rewrite(shape);
                if lines.len() == 1
                    && lines[0].len() > shape.width
                    && matches!(value, Expr::Atom(_))
                {
                    let next = spaces(indent + TAB);
                    lines = vec![format!("{pad}{name}:"), format!("{next}{}", lines[0])];
                } else {
                    lines[0] = format!("{pad}{name}: {}", lines[0]);
                }
                lines.last_mut().expect("a line").push(',');
                lines
            }
            Stmt::Expr(e, suffix) => {
                let mut lines = e.rewrite(Shape::block(indent, suffix.len()));
                lines[0].insert_str(0, &pad);
                lines.last_mut().expect("a line").push_str(suffix);
                lines
            }
            Stmt::Assign { lhs, rhs, suffix } => {
                let shape = Shape::block(indent, suffix.len());
                let orig_shape = shape.offset_left(lhs.len() + 1);
                let orig = rhs.rewrite(orig_shape);
                let mut lines = if orig.len() == 1 && orig[0].len() <= orig_shape.width {
                    vec![format!("{pad}{lhs} {}", orig[0])]
                } else {
                    let next_indent = indent + TAB;
                    let next_shape = Shape::block(next_indent, suffix.len());
                    let next = rhs.rewrite(next_shape);
                    // rustfmt's `filtered_str_fits`: comments do not count.
                    let fits = next[0].len() <= next_shape.width
                        && next[1..]
                            .iter()
                            .filter(|l| !l.trim_start().starts_with("//"))
                            .all(|l| l.len() <= MAX_WIDTH);
                    if fits && prefer_next_line(&orig, &next) {
                        let mut out = vec![format!("{pad}{lhs}")];
                        out.push(format!("{}{}", spaces(next_indent), next[0]));
                        out.extend(next[1..].iter().cloned());
                        out
                    } else {
                        let mut out = vec![format!("{pad}{lhs} {}", orig[0])];
                        out.extend(orig[1..].iter().cloned());
                        out
                    }
                };
                lines.last_mut().expect("a line").push_str(suffix);
                lines
            }
        }
    }
}

/// rustfmt's `prefer_next_line` for a right-hand side laid out on the
/// `let` line (`orig`) and on the next line (`next`).
fn prefer_next_line(orig: &[String], next: &[String]) -> bool {
    let ends = |l: &[String], c: char| l[0].ends_with(c);
    next.len() == 1
        || orig.len() > next.len() + 1
        || ['(', '{', '[']
            .iter()
            .any(|&c| ends(orig, c) && !ends(next, c))
}

/// `use path::{items};` as rustfmt writes it: on one line when it fits,
/// else the items packed on indented lines.
pub fn use_list(path: &str, items: &[&str]) -> String {
    if items.len() == 1 {
        return format!("use {path}::{};\n", items[0]);
    }
    let one = format!("use {path}::{{{}}};", items.join(", "));
    if one.len() <= MAX_WIDTH {
        return format!("{one}\n");
    }
    let mut out = format!("use {path}::{{\n");
    let mut cur = String::new();
    for item in items {
        if !cur.is_empty() && TAB + cur.len() + 1 + item.len() + 1 > MAX_WIDTH {
            out.push_str(&format!("    {}\n", cur.trim_end()));
            cur.clear();
        }
        cur.push_str(item);
        cur.push_str(", ");
    }
    out.push_str(&format!("    {}\n}};\n", cur.trim_end()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(stmt: Stmt, indent: usize) -> String {
        stmt.render(indent).join("\n")
    }

    #[test]
    fn short_calls_stay_on_one_line() {
        let s = Stmt::let_(
            "y",
            Expr::call("ops::linear", vec![Expr::atom("x"), Expr::atom("w")]).try_(),
        );
        assert_eq!(render(s, 8), "        let y = ops::linear(x, w)?;");
    }

    #[test]
    fn a_long_right_hand_side_moves_to_the_next_line() {
        let s = Stmt::let_(
            "post_attention_layernorm",
            Expr::call(
                "ops::rms_norm",
                vec![
                    Expr::atom("&attn_residual"),
                    Expr::atom("w_post_attention_layernorm"),
                    Expr::atom("1e-5"),
                ],
            )
            .try_(),
        );
        assert_eq!(
            render(s, 12),
            "            let post_attention_layernorm =\n                ops::rms_norm(&attn_residual, w_post_attention_layernorm, 1e-5)?;"
        );
    }

    #[test]
    fn wide_arguments_go_one_a_line() {
        let s = Stmt::let_(
            "post_attention_layernorm_full",
            Expr::method(
                "tape.adapt",
                vec![
                    Expr::atom("Adapter::GatherForShards { dim: 1 }"),
                    Expr::atom("tp"),
                    Expr::atom("post_attention_layernorm"),
                ],
            )
            .try_(),
        );
        assert_eq!(
            render(s, 4),
            "    let post_attention_layernorm_full = tape.adapt(\n        Adapter::GatherForShards { dim: 1 },\n        tp,\n        post_attention_layernorm,\n    )?;"
        );
    }

    #[test]
    fn imports_wrap_when_long() {
        assert_eq!(
            use_list("a::b", &["C", "D"]),
            "use a::b::{C, D};\n".to_string()
        );
        let long: Vec<String> = (0..30).map(|i| format!("Item{i}")).collect();
        let items: Vec<&str> = long.iter().map(String::as_str).collect();
        let text = use_list("a::b", &items);
        assert!(text.lines().all(|l| l.len() <= MAX_WIDTH), "{text}");
        assert!(text.starts_with("use a::b::{\n    Item0, Item1,"), "{text}");
    }
}
