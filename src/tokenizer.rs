//! CLIP byte-level BPE tokenizer, id-for-id with transformers 5's `CLIPTokenizer`
//! called as `tok(prompt, padding="max_length", max_length=.., truncation=True)`.
//!
//! transformers 5 ignores the pipeline stored in a CLIP `tokenizer.json`: it keeps only
//! the vocabulary and merges and rebuilds its fixed CLIP pipeline around them, so both
//! folder layouts go through the same `ClipTokenizer::build`.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const DEFAULT_MAX_LENGTH: usize = 77;
/// The pattern transformers' `CLIPTokenizer` splits on (before the byte-level step).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Named special-token keys, in the order transformers registers them (later wins).
const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Added tokens with the ids their file gives them (which only order them).
type AddedById = Vec<(u64, AddedToken)>;

#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl ClipTokenizer {
    /// A diffusers/transformers tokenizer folder: tokenizer.json if present, else
    /// vocab.json + merges.txt.
    /// Pad token from tokenizer_config.json or special_tokens_map.json; default "<|endoftext|>".
    /// model_max_length from tokenizer_config.json, at most 77 (`max_length_of`); the start, end
    /// and pad tokens must be in the vocabulary.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer folder {} does not exist", dir.display());
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = match config_path.is_file() {
            true => as_object(read_json(&config_path)?, &config_path)?,
            false => Map::new(),
        };
        let map_path = dir.join("special_tokens_map.json");
        let special_map = match map_path.is_file() {
            true => Some(as_object(read_json(&map_path)?, &map_path)?),
            false => None,
        };
        let json_path = dir.join("tokenizer.json");
        let merges_path = dir.join("merges.txt");
        let ((vocab, merges, json_added), source) = if json_path.is_file() {
            (read_tokenizer_json(&json_path)?, json_path.clone())
        } else {
            let vocab = read_vocab(&dir.join("vocab.json"))?;
            ((vocab, read_merges(&merges_path)?, Vec::new()), merges_path)
        };
        let max_length = max_length_of(&config, &config_path)?;
        let specials = resolve_specials(config, special_map, json_added);
        let vocab_file = match source == json_path {
            true => json_path,
            false => dir.join("vocab.json"),
        };
        let vocab_file = vocab_file.display().to_string();
        check_specials_in_vocab(&vocab, &specials, &vocab_file, &special_sources(dir))?;
        Self::build(vocab, merges, specials, max_length)
            .map_err(|e| anyhow!("{}: {e}", source.display()))
    }

    /// The slow-tokenizer files alone, as `CLIPTokenizer.from_pretrained` sees a folder
    /// without configs.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, pad_token: &str) -> Result<Self> {
        let (vocab_map, merge_list) = (read_vocab(vocab)?, read_merges(merges)?);
        let specials = resolve_specials(pad_config(pad_token), None, Vec::new());
        let named_in = format!("the pad token {pad_token:?} and CLIP's defaults");
        check_specials_in_vocab(
            &vocab_map,
            &specials,
            &vocab.display().to_string(),
            &named_in,
        )?;
        Self::build(vocab_map, merge_list, specials, DEFAULT_MAX_LENGTH)
            .map_err(|e| anyhow!("{}: {e}", merges.display()))
    }

    /// The real CLIP vocabulary built into the engine (OpenAI's BPE merges, `assets/clip/`), for
    /// single-file checkpoints that carry no tokenizer: the vocabulary is derived from the merges
    /// as CLIP's own tokenizer derives it (256 byte symbols, the same with `</w>`, one token per
    /// merge, then the two specials), which is exactly the `vocab.json` SD checkpoints ship.
    pub fn builtin(pad_token: &str) -> Result<Self> {
        let (vocab, merges) = builtin_vocab_merges()?;
        let specials = resolve_specials(pad_config(pad_token), None, Vec::new());
        let named_in = format!("the pad token {pad_token:?} and CLIP's defaults");
        check_specials_in_vocab(&vocab, &specials, "the built-in CLIP vocabulary", &named_in)?;
        Self::build(vocab, merges, specials, DEFAULT_MAX_LENGTH)
            .map_err(|e| anyhow!("the built-in CLIP vocabulary: {e}"))
    }

    /// A `tokenizer.json` alone, as `CLIPTokenizer.from_pretrained` sees a folder without configs.
    pub fn from_tokenizer_json(path: &Path, pad_token: &str) -> Result<Self> {
        let (vocab, merges, json_added) = read_tokenizer_json(path)?;
        let specials = resolve_specials(pad_config(pad_token), None, json_added);
        let named_in = format!("the pad token {pad_token:?} and CLIP's defaults");
        check_specials_in_vocab(&vocab, &specials, &path.display().to_string(), &named_in)?;
        Self::build(vocab, merges, specials, DEFAULT_MAX_LENGTH)
            .map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    /// The pipeline `CLIPTokenizer.__init__` builds.
    fn build(vocab: Vocab, merges: Merges, specials: Specials, max_length: usize) -> Result<Self> {
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(specials.unk.clone())
            .fuse_unk(false)
            .build()
            .map_err(|e| anyhow!("bad vocabulary or merges: {e}"))?;
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(|e| anyhow!("{e}"))?
                .into(),
            Lowercase.into(),
        ]);
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| anyhow!("{e}"))?;
        let pre_tokenizer =
            PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
        let mut inner = Tokenizer::new(bpe);
        // The normalizer must be in place before adding tokens: normalized ones are matched in
        // normalized form.
        inner.with_normalizer(Some(normalizer));
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.add_tokens(&specials.added);

        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| anyhow!("special token {token:?} has no id"))
        };
        Ok(Self {
            bos_id: id(&specials.bos)?,
            eos_id: id(&specials.eos)?,
            pad_id: id(&specials.pad)?,
            max_length,
            inner,
        })
    }

    /// Exactly `max_length` ids: BOS, tokens, EOS, then padding; long prompts lose tokens from
    /// the end but keep the final EOS, as transformers truncates.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        let body = encoding.get_ids();
        let body = &body[..body.len().min(self.max_length - 2)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(body);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|text| self.encode(text)).collect()
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// `model_max_length` of tokenizer_config.json: absent means CLIP's 77; a whole number of at least
/// 2 (BOS and EOS) is used up to 77, the text model's positions. Larger values are kept working
/// because released configs carry them: transformers' "no limit" sentinel VERY_LARGE_INTEGER
/// (1000000000000000019884624838656, which JSON readers see as a float) means "as the model
/// allows". Anything else (0, negative, fractional, not a number) is a broken file: an error
/// rather than a silent 77.
fn max_length_of(config: &Map<String, Value>, path: &Path) -> Result<usize> {
    let Some(value) = config.get("model_max_length") else {
        return Ok(DEFAULT_MAX_LENGTH);
    };
    let bad = |why: &str| anyhow!("{}: `model_max_length` {value} {why}", path.display());
    let n = value.as_f64().ok_or_else(|| bad("is not a number"))?;
    if !n.is_finite() || n.fract() != 0.0 {
        return Err(bad("is not a whole number"));
    }
    if n < 2.0 {
        return Err(bad(
            "leaves no room for the start and end tokens (at least 2)",
        ));
    }
    Ok((n.min(DEFAULT_MAX_LENGTH as f64)) as usize)
}

/// Where the special tokens of a folder were named (for errors): its configs, else CLIP's
/// defaults.
fn special_sources(dir: &Path) -> String {
    let named: Vec<String> = ["tokenizer_config.json", "special_tokens_map.json"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    match named.is_empty() {
        true => "CLIP's defaults".to_string(),
        false => named.join(" / "),
    }
}

/// The start, end and pad tokens must be in the vocabulary itself: the tokenizer library would
/// otherwise append them as new ids past the vocabulary, ids the text encoder has no embedding for
/// (transformers does the same and fails later, or reads another row), so a prompt would end in
/// the wrong token silently or crash the encoder. `vocab_file` holds the vocabulary, `named_in`
/// says where the tokens came from.
fn check_specials_in_vocab(
    vocab: &Vocab,
    specials: &Specials,
    vocab_file: &str,
    named_in: &str,
) -> Result<()> {
    for (key, token) in [
        ("bos_token", &specials.bos),
        ("eos_token", &specials.eos),
        ("pad_token", &specials.pad),
    ] {
        if !vocab.contains_key(token.as_str()) {
            bail!(
                "{vocab_file}: the vocabulary ({} tokens) lacks the {key} {token:?} (named by \
                 {named_in})",
                vocab.len()
            );
        }
    }
    Ok(())
}

/// The backend's added tokens, with the flags transformers ends up giving them, and the
/// contents of the special tokens the pipeline uses.
struct Specials {
    added: Vec<AddedToken>,
    bos: String,
    eos: String,
    unk: String,
    pad: String,
}

fn pad_config(pad_token: &str) -> Map<String, Value> {
    Map::from_iter([("pad_token".to_string(), Value::from(pad_token))])
}

/// Mirrors `from_pretrained` + `TokenizersBackend.__init__`: `added_tokens_decoder` (or, in its
/// absence, tokenizer.json's `added_tokens`) first, then every special token not already there;
/// a token registered twice keeps its last flags. The flags matter: a `normalized` token also
/// matches its lowercased form, and SD 2's pad "!" becomes an added token, so a "!" in a prompt
/// encodes as the bare "!" rather than the BPE's "!</w>".
fn resolve_specials(
    mut config: Map<String, Value>,
    special_map: Option<Map<String, Value>>,
    json_added: AddedById,
) -> Specials {
    let decoder = added_decoder(&mut config, special_map, json_added);
    let added = register_specials(decoder, special_tokens(&config));
    let content_of = |key: &str| {
        token_of(&config, key)
            .map(|t| t.content)
            .unwrap_or_default()
    };
    Specials {
        bos: content_of("bos_token"),
        eos: content_of("eos_token"),
        unk: content_of("unk_token"),
        pad: content_of("pad_token"),
        added,
    }
}

/// The added tokens by id, sorted: `added_tokens_decoder`, or in the legacy layout (where
/// special_tokens_map.json is merged into `config`) tokenizer.json's `added_tokens`.
fn added_decoder(
    config: &mut Map<String, Value>,
    special_map: Option<Map<String, Value>>,
    json_added: AddedById,
) -> AddedById {
    let mut decoder: AddedById = match config.get("added_tokens_decoder") {
        Some(Value::Object(entries)) => entries
            .iter()
            .filter_map(|(id, v)| Some((id.parse().ok()?, added_token(v)?)))
            .collect(),
        _ => {
            // Legacy layout: special_tokens_map.json overrides the config; its dicts are special.
            for (key, mut value) in special_map.into_iter().flatten() {
                if let Value::Object(m) = &mut value {
                    m.insert("special".into(), Value::Bool(true));
                }
                config.insert(key, value);
            }
            json_added
        }
    };
    decoder.sort_by_key(|(id, _)| *id);
    decoder
}

/// The config's token for `key` (e.g. `bos_token`), else CLIPTokenizer's default.
fn token_of(config: &Map<String, Value>, key: &str) -> Option<AddedToken> {
    // CLIPTokenizer's defaults for the tokens a config leaves out.
    let defaults = [
        ("bos_token", BOS),
        ("eos_token", EOS),
        ("unk_token", EOS),
        ("pad_token", EOS),
    ];
    match config.get(key).and_then(added_token) {
        Some(token) => Some(token),
        None => defaults
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, content)| AddedToken::from(*content, true)),
    }
}

/// Every special token of the config, in the order transformers registers them.
fn special_tokens(config: &Map<String, Value>) -> Vec<AddedToken> {
    // Other "*_token" keys become model-specific special tokens in transformers 5.
    let model_specific = config
        .iter()
        .filter(|(k, _)| k.ends_with("_token") && !SPECIAL_KEYS.contains(&k.as_str()))
        .filter_map(|(_, v)| added_token(v));
    let extras = ["additional_special_tokens", "extra_special_tokens"]
        .iter()
        .filter_map(|key| config.get(*key)?.as_array())
        .flatten()
        .filter_map(added_token);
    SPECIAL_KEYS
        .iter()
        .filter_map(|key| token_of(config, key))
        .chain(model_specific)
        .chain(extras)
        .collect()
}

/// The decoder's tokens, then each special token not among them: one registered again keeps its
/// last flags.
fn register_specials(decoder: AddedById, specials: Vec<AddedToken>) -> Vec<AddedToken> {
    let mut added: Vec<AddedToken> = decoder.into_iter().map(|(_, t)| t).collect();
    let in_decoder = added.len();
    for token in specials {
        if added[..in_decoder]
            .iter()
            .any(|t| t.content == token.content)
        {
            continue;
        }
        match added.iter_mut().find(|t| t.content == token.content) {
            Some(existing) => *existing = token,
            None => added.push(token),
        }
    }
    added
}

/// A special-token entry as Python's `AddedToken` reads it: a bare string is a special token
/// matched verbatim; a dict's `normalized` defaults to "not special".
fn added_token(value: &Value) -> Option<AddedToken> {
    let entry = match value {
        Value::String(s) => return Some(AddedToken::from(s.clone(), true)),
        Value::Object(m) => m,
        _ => return None,
    };
    let flag = |key: &str| entry.get(key).and_then(Value::as_bool);
    let special = flag("special").unwrap_or(false);
    Some(AddedToken {
        content: entry.get("content")?.as_str()?.to_string(),
        single_word: flag("single_word").unwrap_or(false),
        lstrip: flag("lstrip").unwrap_or(false),
        rstrip: flag("rstrip").unwrap_or(false),
        normalized: flag("normalized").unwrap_or(!special),
        special,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::input::read_to_string(path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{} is not valid JSON: {e}", path.display()))
}

fn as_object(value: Value, path: &Path) -> Result<Map<String, Value>> {
    match value {
        Value::Object(m) => Ok(m),
        _ => bail!("{} must hold a JSON object", path.display()),
    }
}

fn vocab_from(value: Option<Value>, path: &Path) -> Result<Vocab> {
    let Some(Value::Object(entries)) = value else {
        bail!(
            "{}: vocabulary is not a JSON object of token ids",
            path.display()
        );
    };
    entries
        .into_iter()
        .map(
            |(token, id)| match id.as_u64().and_then(|id| u32::try_from(id).ok()) {
                Some(id) => Ok((token, id)),
                None => bail!(
                    "{}: vocabulary entry {token:?} has no integer id",
                    path.display()
                ),
            },
        )
        .collect()
}

/// OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT licence; see assets/clip/README.md).
const CLIP_BPE_GZ: &[u8] = include_bytes!("../assets/clip/bpe_simple_vocab_16e6.txt.gz");
/// CLIP keeps the first 49152 − 256 − 2 merges of the file (after its version line).
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// GPT-2's byte symbols in the order CLIP lists them in its vocabulary (the dict order of
/// `bytes_to_unicode()`: the printable Latin-1 bytes first, then the rest as U+0100 onwards).
fn byte_symbols_in_vocab_order() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter()
        .map(|c| char::from_u32(c).expect("valid code point"))
        .collect()
}

/// The built-in vocabulary as the `vocab.json` and `merges.txt` of a tokenizer folder.
pub fn builtin_files() -> Result<(String, String)> {
    let (vocab, merges) = builtin_vocab_merges()?;
    let mut by_id: Vec<(&String, &u32)> = vocab.iter().collect();
    by_id.sort_by_key(|(_, id)| **id);
    let map: Map<String, Value> = by_id
        .into_iter()
        .map(|(t, id)| (t.clone(), Value::from(*id)))
        .collect();
    let mut m = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        m.push_str(a);
        m.push(' ');
        m.push_str(b);
        m.push('\n');
    }
    Ok((serde_json::to_string(&Value::Object(map))?, m))
}

fn builtin_vocab_merges() -> Result<(Vocab, Merges)> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(CLIP_BPE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| anyhow!("the built-in CLIP merges cannot be decompressed: {e}"))?;
    let lines: Vec<&str> = text.split('\n').skip(1).take(CLIP_MERGES).collect();
    if lines.len() != CLIP_MERGES {
        bail!(
            "the built-in CLIP merges hold {} merges, not {CLIP_MERGES}",
            lines.len()
        );
    }
    let merges: Merges = lines
        .iter()
        .enumerate()
        .map(|(n, l)| {
            split_merge(l).ok_or_else(|| bad_merge(Path::new("<built-in CLIP merges>"), n + 2, l))
        })
        .collect::<Result<_>>()?;
    let symbols = byte_symbols_in_vocab_order();
    let mut tokens: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    tokens.extend(symbols.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.into());
    tokens.push(EOS.into());
    let json: Map<String, Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, Value::from(i as u64)))
        .collect();
    Ok((
        vocab_from(
            Some(Value::Object(json)),
            Path::new("<built-in CLIP vocabulary>"),
        )?,
        merges,
    ))
}

fn read_vocab(path: &Path) -> Result<Vocab> {
    vocab_from(Some(read_json(path)?), path)
}

/// Same rules as the `tokenizers` merges reader: "#version" lines skipped, every other line "a b".
fn read_merges(path: &Path) -> Result<Merges> {
    let text = crate::input::read_to_string(path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with("#version"))
        .map(|(n, line)| split_merge(line).ok_or_else(|| bad_merge(path, n + 1, line)))
        .collect()
}

fn split_merge(line: &str) -> Option<(String, String)> {
    match line.split(' ').collect::<Vec<_>>()[..] {
        [a, b] => Some((a.to_string(), b.to_string())),
        _ => None,
    }
}

fn bad_merge(path: &Path, line_no: usize, line: &str) -> anyhow::Error {
    anyhow!(
        "{}: merge {line_no} {line:?} is not two tokens separated by a space",
        path.display()
    )
}

/// Vocabulary, merges and added tokens of a `tokenizer.json`; like transformers, ignores its
/// pipeline.
fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges, AddedById)> {
    let mut json = as_object(read_json(path)?, path)?;
    let Some(Value::Object(mut model)) = json.remove("model") else {
        bail!("{}: no \"model\" object", path.display());
    };
    let vocab = vocab_from(model.remove("vocab"), path)?;
    let Some(Value::Array(merge_values)) = model.remove("merges") else {
        bail!(
            "{}: model has no \"merges\" list (not a BPE tokenizer)",
            path.display()
        );
    };
    let merges = merge_values
        .iter()
        .enumerate()
        .map(|(n, merge)| {
            let pair = match merge {
                Value::String(line) => split_merge(line),
                Value::Array(pair) => match &pair[..] {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| bad_merge(path, n + 1, &merge.to_string()))
        })
        .collect::<Result<Merges>>()?;
    let added = match json.get("added_tokens") {
        Some(Value::Array(tokens)) => tokens
            .iter()
            .filter_map(|t| Some((t.get("id")?.as_u64()?, added_token(t)?)))
            .collect(),
        _ => Vec::new(),
    };
    Ok((vocab, merges, added))
}

/// GPT-2's byte → printable character table that byte-level BPE vocabularies are written in.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in printable.iter().zip(&chars) {
        table[*b as usize] = char::from_u32(*c).expect("valid code point");
    }
    table
}

impl ClipTokenizer {
    /// A merge-free byte-level CLIP vocabulary (256 bytes, 256 word-final bytes, BOS, EOS: 514
    /// ids) for the built-in demo model, which must not depend on files on disk.
    pub fn byte_level() -> Result<Self> {
        let table = bytes_to_unicode();
        let mut vocab = Vocab::default();
        for (i, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), i as u32);
            vocab.insert(format!("{c}</w>"), 256 + i as u32);
        }
        vocab.insert(BOS.into(), 512);
        vocab.insert(EOS.into(), 513);
        let specials = resolve_specials(pad_config(EOS), None, Vec::new());
        Self::build(vocab, Merges::default(), specials, DEFAULT_MAX_LENGTH)
    }
}
