//! Builds a document's JSON tree under [`Limits`], counting as it goes: YAML aliases are
//! expanded by the parser each time they are used, so a small file can describe a tree far
//! larger than itself (3,000 references to an anchor of 3,000 scalars are 9 million values);
//! counting while building stops it before the memory is taken, not after.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Number, Value};

/// Bounds on the manifests of one app, checked while they are parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most documents in one file.
    pub documents_per_file: usize,
    /// Deepest nesting of lists and mappings in a document.
    pub depth: usize,
    /// Longest single scalar (a string, or a mapping key), in bytes.
    pub scalar_bytes: usize,
    /// Most values (every scalar, list, mapping and key, each alias counted every time it is
    /// used) all parsed files of an app may hold together.
    pub values: usize,
    /// Most bytes of strings (keys included, aliases counted every time) all parsed files of
    /// an app may hold together.
    pub string_bytes: usize,
}

/// The limits every app is parsed with.
///
/// - 10,000 documents per file: far more objects than one file of a real app holds, and
///   what keeps a file of empty documents (`---` lines) from costing a value each.
/// - Depth 100: the deepest real manifests (CRD schemas embedding a pod template) stay under
///   60; serde_yaml and serde_json stop at 128 with a less helpful message.
/// - 3 MiB per scalar: the API server refuses requests over 3 MiB, so no object holding a
///   longer string could ever be applied.
/// - 1,000,000 values and 64 MiB of strings per app: about 100 MiB of parsed objects at most,
///   a quarter of the pod's memory limit in deploy/ (384 MiB) that the blob cache and the
///   receiver share. An app of 5,000 Deployments holds about 300,000 values.
pub const LIMITS: Limits = Limits {
    documents_per_file: 10_000,
    depth: 100,
    scalar_bytes: 3 << 20,
    values: 1_000_000,
    string_bytes: 64 << 20,
};

/// Which bound a manifest crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Documents,
    Depth,
    Scalar(usize),
    Values,
    StringBytes,
}

impl Exceeded {
    /// What went wrong, for a user who has to fix the file.
    pub fn describe(self, limits: &Limits) -> String {
        match self {
            Exceeded::Documents => format!(
                "more than {} documents in one file; split it into several files",
                limits.documents_per_file
            ),
            Exceeded::Depth => format!("nested deeper than {} levels", limits.depth),
            Exceeded::Scalar(len) => format!(
                "a string of {len} bytes, over the {} bytes a Kubernetes API request may hold",
                limits.scalar_bytes
            ),
            Exceeded::Values => format!(
                "the app's manifests expand to more than {} values (each use of a YAML alias \
                 counts)",
                limits.values
            ),
            Exceeded::StringBytes => format!(
                "the app's manifests expand to more than {} bytes of strings (each use of a YAML \
                 alias counts)",
                limits.string_bytes
            ),
        }
    }
}

/// What the manifests of one app may still take: shared by all files parsed in one pass, so
/// many small files cannot add up to what one file may not hold.
#[derive(Debug, Clone)]
pub struct Budget {
    limits: Limits,
    values: usize,
    string_bytes: usize,
    /// The bound crossed, kept here because the parser's error type only carries text.
    pub(super) exceeded: Option<Exceeded>,
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(LIMITS)
    }
}

impl Budget {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            values: 0,
            string_bytes: 0,
            exceeded: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn refuse<E: de::Error>(&mut self, why: Exceeded) -> E {
        self.exceeded = Some(why);
        E::custom(why.describe(&self.limits))
    }

    /// Takes one value of `string_len` bytes of text (0 for anything but strings and keys).
    fn take<E: de::Error>(&mut self, string_len: usize) -> Result<(), E> {
        if string_len > self.limits.scalar_bytes {
            return Err(self.refuse(Exceeded::Scalar(string_len)));
        }
        self.values += 1;
        if self.values > self.limits.values {
            return Err(self.refuse(Exceeded::Values));
        }
        self.string_bytes += string_len;
        if self.string_bytes > self.limits.string_bytes {
            return Err(self.refuse(Exceeded::StringBytes));
        }
        Ok(())
    }

    /// Records that a file has more documents than allowed.
    pub(super) fn too_many_documents(&mut self) -> String {
        self.exceeded = Some(Exceeded::Documents);
        Exceeded::Documents.describe(&self.limits)
    }
}

/// Deserializes one document into a [`Value`] exactly as `Value::deserialize` does, taking
/// every value from the budget first.
pub struct Bounded<'b> {
    pub budget: &'b mut Budget,
    pub depth: usize,
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Bounded<'_> {
    fn reborrow(&mut self) -> Bounded<'_> {
        Bounded {
            budget: &mut *self.budget,
            depth: self.depth,
        }
    }

    /// The seed for the items of a list or mapping one level down, which itself counts as
    /// a value.
    fn nested<E: de::Error>(&mut self) -> Result<Bounded<'_>, E> {
        if self.depth >= self.budget.limits.depth {
            return Err(self.budget.refuse(Exceeded::Depth));
        }
        self.budget.take(0)?;
        Ok(Bounded {
            budget: &mut *self.budget,
            depth: self.depth + 1,
        })
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.budget.take(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.budget.take(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.budget.take(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.budget.take(0)?;
        Value::deserialize(de::value::I128Deserializer::<E>::new(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.budget.take(0)?;
        Value::deserialize(de::value::U128Deserializer::<E>::new(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.budget.take(0)?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.budget.take(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.budget.take(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.budget.take(0)?;
        Ok(Value::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.take(0)?;
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        let mut inner = self.nested()?;
        while let Some(item) = seq.next_element_seed(inner.reborrow())? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Map::new();
        let mut inner = self.nested()?;
        while let Some(key) = map.next_key_seed(Key {
            budget: &mut *inner.budget,
        })? {
            let value = map.next_value_seed(inner.reborrow())?;
            // A repeated key keeps the last value, as `Value::deserialize` does.
            entries.insert(key, value);
        }
        Ok(Value::Object(entries))
    }
}

/// A mapping key: a string (YAML scalars of any type are read as their text), counted.
struct Key<'b> {
    budget: &'b mut Budget,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.budget.take(v.len())?;
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        self.budget.take(v.len())?;
        Ok(v)
    }
}
