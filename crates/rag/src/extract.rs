//! Uploaded files to text: plain text and Markdown decoded as browsers decode
//! text (a byte-order mark, else UTF-8, else Windows-1252), HTML through
//! Servo's parser with scripts, styles and other non-content dropped and
//! headings kept as Markdown headings, PDF through `pdf-extract` (which reads
//! the fonts' encodings), pages apart.
//!
//! HTML and PDF parsers meet hostile bytes here; the server runs them in a
//! child process with limits (see the server's `extract` module), so that a
//! parser's crash, runaway loop or memory blow-up costs one upload, never the
//! server.

use crate::RagError;

/// What a file holds, which decides how it becomes text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Text,
    Markdown,
    Html,
    Pdf,
}

impl FileKind {
    /// The kind by the file's name, then its declared content type, then its
    /// first bytes (`%PDF-`); `None` when nothing says it is one we read.
    pub fn detect(file_name: &str, content_type: Option<&str>, bytes: &[u8]) -> Option<Self> {
        let extension = file_name
            .rsplit_once('.')
            .map(|(_, ext)| ext.to_ascii_lowercase());
        let by_name = match extension.as_deref() {
            Some("txt" | "text" | "log" | "csv" | "tsv" | "rst") => Some(Self::Text),
            Some("md" | "markdown" | "mdx") => Some(Self::Markdown),
            Some("html" | "htm" | "xhtml") => Some(Self::Html),
            Some("pdf") => Some(Self::Pdf),
            _ => None,
        };
        let essence = content_type
            .and_then(|t| t.split(';').next())
            .map(|t| t.trim().to_ascii_lowercase());
        let by_type = match essence.as_deref() {
            Some("text/plain" | "text/csv") => Some(Self::Text),
            Some("text/markdown" | "text/x-markdown") => Some(Self::Markdown),
            Some("text/html" | "application/xhtml+xml") => Some(Self::Html),
            Some("application/pdf") => Some(Self::Pdf),
            _ => None,
        };
        let by_magic = bytes.starts_with(b"%PDF-").then_some(Self::Pdf);
        by_name.or(by_type).or(by_magic)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Markdown => "markdown",
            Self::Html => "html",
            Self::Pdf => "pdf",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Text, Self::Markdown, Self::Html, Self::Pdf]
            .into_iter()
            .find(|k| k.name() == name)
    }

    /// Whether its text is best split as Markdown (HTML comes out as
    /// Markdown headings and paragraphs).
    pub fn markdown(self) -> bool {
        matches!(self, Self::Markdown | Self::Html)
    }

    /// Whether reading it runs a parser over untrusted structure (the server
    /// isolates those in a child process).
    pub fn needs_parser(self) -> bool {
        matches!(self, Self::Html | Self::Pdf)
    }
}

/// The text of a file of `kind`. An empty result is an error naming why (a
/// PDF of scanned pages has no text layer).
pub fn extract(kind: FileKind, bytes: &[u8]) -> Result<String, RagError> {
    let text = match kind {
        FileKind::Text | FileKind::Markdown => {
            let text = decode(bytes);
            if looks_binary(&text) {
                return Err(RagError::invalid(
                    "file",
                    "the file is binary, not text: upload .txt, .md, .html or .pdf",
                ));
            }
            text
        }
        FileKind::Html => html_text(&decode(bytes)),
        FileKind::Pdf => pdf_text(bytes)?,
    };
    if text.trim().is_empty() {
        let why = match kind {
            FileKind::Pdf => "the PDF has no text layer (scanned pages need OCR first)",
            _ => "the file has no text",
        };
        return Err(RagError::invalid("file", why));
    }
    Ok(text)
}

/// Bytes to text as a browser decodes an unlabeled text file: the byte-order
/// mark's encoding, else UTF-8 when the bytes are UTF-8, else Windows-1252.
pub fn decode(bytes: &[u8]) -> String {
    if let Some((encoding, bom)) = encoding_rs::Encoding::for_bom(bytes) {
        let (text, _) = encoding.decode_without_bom_handling(&bytes[bom..]);
        return text.into_owned();
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => encoding_rs::WINDOWS_1252
            .decode_without_bom_handling(bytes)
            .0
            .into_owned(),
    }
}

/// NUL and other C0 controls (not tab or line breaks) in more than 1% of the
/// first 8 KiB: an executable or image sent as text.
fn looks_binary(text: &str) -> bool {
    let head: Vec<char> = text.chars().take(8192).collect();
    let controls = head
        .iter()
        .filter(|&&c| c < ' ' && !matches!(c, '\t' | '\n' | '\r' | '\x0c'))
        .count();
    controls * 100 > head.len()
}

/// Elements whose content is not the page's text.
const SKIPPED: &[&str] = &[
    "script", "style", "noscript", "template", "svg", "math", "head", "iframe", "object", "canvas",
    "select", "button",
];

/// Elements that end a line of text.
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "tr",
    "table",
    "section",
    "article",
    "aside",
    "header",
    "footer",
    "nav",
    "main",
    "blockquote",
    "pre",
    "hr",
    "figure",
    "figcaption",
    "form",
    "address",
    "details",
    "summary",
];

/// The visible text of an HTML document: headings as Markdown headings
/// (so splitting follows the page's sections), a block per paragraph, the
/// title first. The tree walk is iterative: nesting depth costs no stack.
pub fn html_text(html: &str) -> String {
    use ego_tree::iter::Edge;
    use scraper::node::Node;
    let document = scraper::Html::parse_document(html);
    let mut out = String::new();
    let title = document
        .tree
        .root()
        .descendants()
        .find(|n| matches!(n.value(), Node::Element(e) if e.name() == "title"))
        .map(|n| {
            n.descendants()
                .filter_map(|d| d.value().as_text().map(|t| String::from(&**t)))
                .collect::<String>()
        });
    if let Some(title) = title.map(|t| collapse(&t)).filter(|t| !t.is_empty()) {
        out.push_str("# ");
        out.push_str(&title);
        out.push_str("\n\n");
    }
    let mut skipping = 0usize;
    let mut pre = 0usize;
    for edge in document.tree.root().traverse() {
        match edge {
            Edge::Open(node) => match node.value() {
                Node::Element(e) => {
                    let name = e.name();
                    if skipping > 0 || SKIPPED.contains(&name) {
                        skipping += 1;
                    } else if let Some(level) = heading_level(name) {
                        block_break(&mut out);
                        out.push_str(&"#".repeat(level));
                        out.push(' ');
                    } else if BLOCKS.contains(&name) {
                        if name == "li" {
                            line_break(&mut out);
                            out.push_str("- ");
                        } else {
                            block_break(&mut out);
                        }
                        if name == "pre" {
                            pre += 1;
                        }
                    } else if matches!(name, "td" | "th") && !out.ends_with('\n') {
                        out.push_str(" | ");
                    }
                }
                Node::Text(text) if skipping == 0 => {
                    let text: &str = text;
                    if pre > 0 {
                        out.push_str(text);
                    } else {
                        push_words(&mut out, text);
                    }
                }
                _ => {}
            },
            Edge::Close(node) => {
                if let Node::Element(e) = node.value() {
                    let name = e.name();
                    if skipping > 0 {
                        skipping -= 1;
                    } else if name == "li" {
                        line_break(&mut out);
                    } else if heading_level(name).is_some() || BLOCKS.contains(&name) {
                        if name == "pre" {
                            pre = pre.saturating_sub(1);
                        }
                        block_break(&mut out);
                    }
                }
            }
        }
    }
    out.trim().to_owned()
}

fn heading_level(name: &str) -> Option<usize> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

/// Whitespace runs as single spaces, trimmed.
fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Appends a text node's words, with one space where the source had any.
fn push_words(out: &mut String, text: &str) {
    let starts_spaced = text.starts_with(char::is_whitespace);
    let words = collapse(text);
    if words.is_empty() {
        if starts_spaced && !out.is_empty() && !out.ends_with(char::is_whitespace) {
            out.push(' ');
        }
        return;
    }
    if starts_spaced && !out.is_empty() && !out.ends_with(char::is_whitespace) {
        out.push(' ');
    }
    out.push_str(&words);
    if text.ends_with(char::is_whitespace) {
        out.push(' ');
    }
}

fn trim_end_spaces(out: &mut String) {
    while out.ends_with(' ') {
        out.pop();
    }
}

fn line_break(out: &mut String) {
    trim_end_spaces(out);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
}

fn block_break(out: &mut String) {
    trim_end_spaces(out);
    if out.is_empty() || out.ends_with("\n\n") {
        return;
    }
    out.push_str(if out.ends_with('\n') { "\n" } else { "\n\n" });
}

/// A PDF's text, its pages apart (a blank line between them).
fn pdf_text(bytes: &[u8]) -> Result<String, RagError> {
    let pages = pdf_extract::extract_text_from_mem_by_pages(bytes)
        .map_err(|e| RagError::invalid("file", format!("the PDF could not be read: {e}")))?;
    Ok(pages
        .iter()
        .map(|page| page.trim())
        .filter(|page| !page.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_the_name_then_the_type_then_the_bytes() {
        assert_eq!(
            FileKind::detect("a.MD", None, b""),
            Some(FileKind::Markdown)
        );
        assert_eq!(
            FileKind::detect("notes", Some("text/html; charset=utf-8"), b""),
            Some(FileKind::Html)
        );
        assert_eq!(
            FileKind::detect("scan", Some("application/octet-stream"), b"%PDF-1.7\n"),
            Some(FileKind::Pdf)
        );
        assert_eq!(
            FileKind::detect("photo.png", Some("image/png"), b"\x89PNG"),
            None
        );
        for kind in [
            FileKind::Text,
            FileKind::Markdown,
            FileKind::Html,
            FileKind::Pdf,
        ] {
            assert_eq!(FileKind::from_name(kind.name()), Some(kind));
        }
    }

    #[test]
    fn text_is_decoded_as_browsers_decode_it() {
        assert_eq!(decode("naïve".as_bytes()), "naïve");
        assert_eq!(decode(b"\xef\xbb\xbfbom"), "bom");
        assert_eq!(decode(b"\xff\xfeh\x00i\x00"), "hi");
        // Latin-1 bytes that are not UTF-8: Windows-1252.
        assert_eq!(
            decode(b"caf\xe9 \x93quoted\x94"),
            "café \u{201c}quoted\u{201d}"
        );
        let binary = extract(
            FileKind::Text,
            b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00",
        );
        assert!(matches!(
            binary,
            Err(RagError::Invalid { param: "file", .. })
        ));
        assert!(extract(FileKind::Markdown, b" \n\t ").is_err());
    }

    #[test]
    fn html_keeps_the_text_and_headings_and_drops_the_rest() {
        let html = r#"<!doctype html><html><head><title>The  Guide</title>
            <style>body { color: red }</style><script>var secret = "drop me";</script></head>
            <body><nav><a href="/">Home</a></nav>
            <h1>Containers</h1><p>Docker   packages <b>applications</b> with
            their dependencies.</p><script>alert("no")</script>
            <h2>Orchestration</h2><ul><li>Kubernetes schedules</li><li>it scales</li></ul>
            <pre>  keep   this
  spacing</pre><noscript>enable js</noscript><table><tr><td>a</td><td>b</td></tr></table>
            </body></html>"#;
        let text = html_text(html);
        assert!(text.starts_with("# The Guide\n\n"), "{text}");
        assert!(
            text.contains("# Containers\n\nDocker packages applications with their dependencies."),
            "{text}"
        );
        assert!(
            text.contains("## Orchestration\n\n- Kubernetes schedules\n- it scales"),
            "{text}"
        );
        assert!(text.contains("  keep   this\n  spacing"), "{text}");
        assert!(text.contains("a | b"), "{text}");
        for dropped in ["color: red", "secret", "alert", "enable js"] {
            assert!(!text.contains(dropped), "{dropped} in {text}");
        }
    }

    #[test]
    fn deeply_nested_html_costs_no_stack() {
        let depth = 5_000;
        let html = format!(
            "{}deep text{}",
            "<div>".repeat(depth),
            "</div>".repeat(depth)
        );
        assert!(html_text(&html).contains("deep text"));
    }

    #[test]
    fn garbage_pdfs_are_a_clear_error() {
        for bytes in [&b"%PDF-1.4\nnot really"[..], b"", b"%PDF-"] {
            match extract(FileKind::Pdf, bytes) {
                Err(RagError::Invalid {
                    param: "file",
                    message,
                }) => {
                    assert!(message.contains("PDF"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
