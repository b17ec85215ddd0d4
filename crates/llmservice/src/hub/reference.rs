//! What a user names when they ask for a model from the Hub, and which of a
//! repository's files that means. Pure: no network, unit-tested.
//!
//! Accepted forms (the ones people paste from llama.cpp, Ollama and the Hub):
//! - `owner/name`: the repository's one GGUF model, else its `Q4_K_M`
//!   (llama.cpp's `-hf` default), else a list of the choices;
//! - `owner/name/path/to/file.gguf`: that file;
//! - `owner/name:Q5_K_M`, `hf.co/owner/name:Q5_K_M`: the file with that
//!   quantization (Ollama's and llama.cpp's tag form);
//! - `https://huggingface.co/owner/name/resolve/main/file.gguf` (or `/blob/`).

use super::HubError;

/// A repository and, when the user named one, a file or quantization in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub repo: String,
    pub file: Option<String>,
    pub quant: Option<String>,
    pub revision: Option<String>,
}

/// One file of a repository, as the Hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Its path in the repository.
    pub path: String,
    pub size: Option<u64>,
    /// The LFS object's SHA-256 (hex), which the download is checked against.
    pub sha256: Option<String>,
}

impl RepoFile {
    /// The name the file gets in the models directory.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

impl ModelRef {
    pub fn parse(text: &str) -> Result<Self, HubError> {
        let invalid = |why: &str| HubError::InvalidReference {
            reference: text.to_owned(),
            reason: why.to_owned(),
        };
        let mut rest = text.trim();
        for prefix in ["https://", "http://"] {
            if let Some(url) = rest.strip_prefix(prefix) {
                // A pasted link may carry `?download=true` or a fragment.
                rest = url.split(['?', '#']).next().unwrap_or(url);
            }
        }
        for host in ["huggingface.co/", "hf.co/", "www.huggingface.co/"] {
            rest = rest.strip_prefix(host).unwrap_or(rest);
        }
        let rest = rest.trim_matches('/');
        let mut parts = rest.splitn(3, '/');
        let (Some(owner), Some(name_tag)) = (parts.next(), parts.next()) else {
            return Err(invalid(
                "expected owner/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
            ));
        };
        let (name, quant) = match name_tag.split_once(':') {
            Some((name, tag)) if !tag.is_empty() => (name, Some(tag.to_owned())),
            Some(_) => return Err(invalid("an empty tag after ':'")),
            None => (name_tag, None),
        };
        for part in [owner, name] {
            check_name(part).map_err(|why| invalid(&why))?;
        }
        let (file, revision) = match parts.next() {
            None => (None, None),
            Some(path) => {
                // A link to a file: `resolve/<rev>/<path>` or `blob/<rev>/<path>`.
                let linked = path
                    .strip_prefix("resolve/")
                    .or_else(|| path.strip_prefix("blob/"))
                    .and_then(|p| p.split_once('/'));
                match linked {
                    Some((revision, path)) => (Some(path.to_owned()), Some(revision.to_owned())),
                    None => (Some(path.to_owned()), None),
                }
            }
        };
        if let Some(file) = &file {
            check_path(file).map_err(|why| invalid(&why))?;
            if quant.is_some() {
                return Err(invalid("name either a file or a :TAG, not both"));
            }
        }
        Ok(Self {
            repo: format!("{owner}/{name}"),
            file,
            quant,
            revision,
        })
    }
}

/// Hub names: letters, digits, `-`, `_`, `.`; never `.` or `..` alone.
fn check_name(part: &str) -> Result<(), String> {
    let ok = !part.is_empty()
        && part.len() <= 96
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("'{part}' is not a valid Hub name"))
    }
}

/// A path inside a repository: relative, no `..`, no empty segments. The
/// file lands in the models directory under its last segment only.
fn check_path(path: &str) -> Result<(), String> {
    let bad = path.is_empty()
        || path.len() > 1024
        || path.starts_with('/')
        || path.contains(['\\', '?', '#'])
        || path.chars().any(char::is_control)
        || path
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == ".." || s.starts_with('.'));
    if bad {
        Err(format!("'{path}' is not a file path inside a repository"))
    } else {
        Ok(())
    }
}

fn is_gguf(path: &str) -> bool {
    path.to_ascii_lowercase().ends_with(".gguf")
}

/// `name-00001-of-00003.gguf` → (`name`, 1, 3).
fn split_part(path: &str) -> Option<(&str, u32, u32)> {
    let stem = path
        .strip_suffix(".gguf")
        .or_else(|| path.strip_suffix(".GGUF"))?;
    let (head, total) = stem.rsplit_once("-of-")?;
    let (base, part) = head.rsplit_once('-')?;
    let (part, total) = (part.parse().ok()?, total.parse().ok()?);
    (part >= 1 && part <= total).then_some((base, part, total))
}

/// A model as a set of files: one file, or every part of a split model.
#[derive(Debug, Clone)]
struct ModelSet {
    /// The first file's path, which names the set.
    name: String,
    files: Vec<RepoFile>,
}

impl ModelSet {
    fn size(&self) -> u64 {
        self.files.iter().filter_map(|f| f.size).sum()
    }
}

/// The repository's GGUF models, each split model grouped into one set (a
/// set missing parts is left out: it could not load).
fn model_sets(files: &[RepoFile]) -> Vec<ModelSet> {
    let mut sets: Vec<ModelSet> = Vec::new();
    for file in files.iter().filter(|f| is_gguf(&f.path)) {
        match split_part(&file.path) {
            None => sets.push(ModelSet {
                name: file.path.clone(),
                files: vec![file.clone()],
            }),
            Some((base, 1, total)) => {
                let mut parts: Vec<RepoFile> = files
                    .iter()
                    .filter(|f| matches!(split_part(&f.path), Some((b, _, t)) if b == base && t == total))
                    .cloned()
                    .collect();
                parts.sort_by_key(|f| split_part(&f.path).map(|(_, p, _)| p));
                if parts.len() == total as usize {
                    sets.push(ModelSet {
                        name: file.path.clone(),
                        files: parts,
                    });
                }
            }
            Some(_) => {}
        }
    }
    sets
}

/// Whether a model set is a vision projector rather than a language model.
fn is_projector(set: &ModelSet) -> bool {
    set.name.to_ascii_lowercase().contains("mmproj")
}

/// Whether `name` carries quantization `quant` as a whole token (`Q4_K`
/// does not match `Q4_K_M`).
fn has_quant(name: &str, quant: &str) -> bool {
    let name = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
    let quant = quant.to_ascii_lowercase();
    let is_sep = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
    name.match_indices(&quant).any(|(at, _)| {
        is_sep(name[..at].chars().next_back()) && is_sep(name[at + quant.len()..].chars().next())
    })
}

/// The quantization llama.cpp's `-hf` picks when none is named.
const DEFAULT_QUANT: &str = "Q4_K_M";

/// The files `reference` means in a repository that holds `files`.
pub fn choose(reference: &ModelRef, files: &[RepoFile]) -> Result<Vec<RepoFile>, HubError> {
    let sets = model_sets(files);
    if let Some(wanted) = &reference.file {
        let found =
            files
                .iter()
                .find(|f| &f.path == wanted)
                .ok_or_else(|| HubError::FileNotFound {
                    repo: reference.repo.clone(),
                    file: wanted.clone(),
                    choices: sets.iter().map(|s| s.name.clone()).collect(),
                })?;
        // Any part of a split model brings the whole model.
        if let Some(set) = sets
            .iter()
            .find(|s| s.files.iter().any(|f| f.path == found.path))
        {
            return Ok(set.files.clone());
        }
        return Ok(vec![found.clone()]);
    }
    let models: Vec<&ModelSet> = sets.iter().filter(|s| !is_projector(s)).collect();
    if models.is_empty() {
        let held: Vec<String> = files.iter().take(8).map(|f| f.path.clone()).collect();
        return Err(HubError::NoGguf {
            repo: reference.repo.clone(),
            files: held,
        });
    }
    let candidates: Vec<&ModelSet> = match &reference.quant {
        Some(quant) => models
            .iter()
            .copied()
            .filter(|s| has_quant(&s.name, quant))
            .collect(),
        None if models.len() == 1 => models.clone(),
        None => models
            .iter()
            .copied()
            .filter(|s| has_quant(&s.name, DEFAULT_QUANT))
            .collect(),
    };
    match candidates.as_slice() {
        [one] => Ok(one.files.clone()),
        _ => Err(HubError::Ambiguous {
            repo: reference.repo.clone(),
            quant: reference.quant.clone(),
            choices: (if candidates.is_empty() {
                &models
            } else {
                &candidates
            })
            .iter()
            .map(|s| (s.name.clone(), s.size()))
            .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> RepoFile {
        RepoFile {
            path: path.to_owned(),
            size: Some(10),
            sha256: None,
        }
    }

    fn names(files: &[RepoFile]) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn references_in_the_forms_people_paste() {
        let r = ModelRef::parse("TheBloke/Llama-2-7B-Chat-GGUF").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.file, r.quant),
            ("TheBloke/Llama-2-7B-Chat-GGUF", None, None)
        );
        let r =
            ModelRef::parse("TheBloke/Llama-2-7B-Chat-GGUF/llama-2-7b-chat.Q4_K_M.gguf").unwrap();
        assert_eq!(r.file.as_deref(), Some("llama-2-7b-chat.Q4_K_M.gguf"));
        let r = ModelRef::parse("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q8_0").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.quant.as_deref()),
            ("bartowski/Qwen2.5-0.5B-Instruct-GGUF", Some("Q8_0"))
        );
        let r = ModelRef::parse("https://huggingface.co/a/b/resolve/main/sub/m.gguf").unwrap();
        assert_eq!(
            (r.file.as_deref(), r.revision.as_deref()),
            (Some("sub/m.gguf"), Some("main"))
        );
        let r =
            ModelRef::parse("https://huggingface.co/a/b/blob/v1.0/m.gguf?download=true").unwrap();
        assert_eq!(
            (r.file.as_deref(), r.revision.as_deref()),
            (Some("m.gguf"), Some("v1.0"))
        );
    }

    #[test]
    fn hostile_references_are_refused() {
        for bad in [
            "",
            "justone",
            "../x",
            "a/..",
            "a/b/../../etc/passwd",
            "a/b/.hidden.gguf",
            "a/b//m.gguf",
            "a b/c",
            "a/b:",
            "a/b:Q4/m.gguf",
            "a/b/x\\y.gguf",
            "a/b/\u{0}.gguf",
            "a/b/m.gguf?x=1",
        ] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn one_model_needs_no_choice() {
        let r = ModelRef::parse("o/n").unwrap();
        let files = [file("README.md"), file("model-q4_1.gguf")];
        assert_eq!(names(&choose(&r, &files).unwrap()), ["model-q4_1.gguf"]);
    }

    #[test]
    fn several_quantizations_default_to_q4_k_m_or_list_the_choices() {
        let files = [
            file("m.Q2_K.gguf"),
            file("m.Q4_K.gguf"),
            file("m.Q4_K_M.gguf"),
            file("m.Q4_K_M-mmproj.gguf"),
            file("m.Q8_0.gguf"),
        ];
        let pick = |text: &str| choose(&ModelRef::parse(text).unwrap(), &files);
        assert_eq!(names(&pick("o/n").unwrap()), ["m.Q4_K_M.gguf"]);
        assert_eq!(names(&pick("o/n:q8_0").unwrap()), ["m.Q8_0.gguf"]);
        assert_eq!(names(&pick("o/n:Q4_K").unwrap()), ["m.Q4_K.gguf"]);
        match pick("o/n:Q3_K_S") {
            Err(HubError::Ambiguous { choices, .. }) => assert_eq!(choices.len(), 4),
            other => panic!("{other:?}"),
        }
        let no_default = [file("a.Q8_0.gguf"), file("a.F16.gguf")];
        assert!(matches!(
            choose(&ModelRef::parse("o/n").unwrap(), &no_default),
            Err(HubError::Ambiguous { .. })
        ));
    }

    #[test]
    fn split_models_come_whole() {
        let files = [
            file("big/m-Q4_K_M-00002-of-00003.gguf"),
            file("big/m-Q4_K_M-00001-of-00003.gguf"),
            file("big/m-Q4_K_M-00003-of-00003.gguf"),
            file("m-Q8_0-00001-of-00002.gguf"), // its second part is missing
        ];
        let all = choose(&ModelRef::parse("o/n").unwrap(), &files).unwrap();
        assert_eq!(
            names(&all),
            [
                "big/m-Q4_K_M-00001-of-00003.gguf",
                "big/m-Q4_K_M-00002-of-00003.gguf",
                "big/m-Q4_K_M-00003-of-00003.gguf"
            ]
        );
        let r = ModelRef::parse("o/n/big/m-Q4_K_M-00002-of-00003.gguf").unwrap();
        assert_eq!(choose(&r, &files).unwrap().len(), 3);
    }

    #[test]
    fn repositories_without_gguf_say_what_they_hold() {
        let r = ModelRef::parse("microsoft/DialoGPT-medium").unwrap();
        match choose(&r, &[file("pytorch_model.bin"), file("config.json")]) {
            Err(HubError::NoGguf { files, .. }) => assert_eq!(files.len(), 2),
            other => panic!("{other:?}"),
        }
        let r = ModelRef::parse("o/n/missing.gguf").unwrap();
        assert!(matches!(
            choose(&r, &[file("m.gguf")]),
            Err(HubError::FileNotFound { .. })
        ));
    }
}
