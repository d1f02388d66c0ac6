//! Live objects as the drift checks read them: LISTs decoded into compact JSON text, each
//! object by name, without the `metadata.managedFields` that the comparisons never look at
//! (often half of a small object). A batch of a sweep lists thousands of objects at once, its
//! largest allocation: decoding skips managedFields, so they are never held, and each object
//! is kept as text (a fifth of its size as a `serde_json::Value`, whose every small map is a
//! B-tree node), parsed again only when its app's check compares it.

use std::collections::HashMap;
use std::fmt;

use kube::api::{DynamicObject, ListParams};
use kube::core::ObjectList;
use kube::Api;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::state::for_each_page;

/// Live objects of one LIST, by name, as compact JSON text without their managedFields.
pub(super) type ByName = HashMap<String, Box<str>>;

/// The live object `name` of `listed`, parsed (none when absent or, never expected, not JSON).
pub(super) fn get(listed: &ByName, name: &str) -> Option<Value> {
    serde_json::from_str(listed.get(name)?).ok()
}

/// Every object of a LIST (paged as `params` says) through `api`'s URL, by name, without
/// managedFields; each request made (one per page, a failed one too) is added to `requests`.
pub(super) async fn list(
    api: &Api<DynamicObject>,
    params: ListParams,
    requests: &mut usize,
) -> Result<ByName, kube::Error> {
    let client = api.clone().into_client();
    let url = api.resource_url();
    let mut all = ByName::new();
    let page = |p: ListParams| {
        let client = client.clone();
        async move {
            let request = kube::core::Request::new(url).list(&p);
            client
                .request::<ObjectList<Slim>>(request.map_err(kube::Error::BuildRequest)?)
                .await
        }
    };
    for_each_page(params, requests, page, |items: Vec<Slim>| {
        all.extend(items.into_iter().filter_map(Slim::named));
    })
    .await?;
    Ok(all)
}

/// One object of a LIST: its name (none: a nameless object, left out) and its JSON text
/// without `metadata.managedFields`. Made as each object is decoded, so a page is never held
/// as `Value`s.
#[derive(Clone, Debug)]
struct Slim(Option<(String, Box<str>)>);

impl Slim {
    fn named(self) -> Option<(String, Box<str>)> {
        self.0
    }
}

impl<'de> Deserialize<'de> for Slim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let object = Value::Object(d.deserialize_map(ObjectVisitor { metadata: false })?);
        let Some(name) = object["metadata"]["name"].as_str() else {
            return Ok(Slim(None));
        };
        let text = serde_json::to_string(&object).map_err(serde::de::Error::custom)?;
        Ok(Slim(Some((name.to_string(), text.into_boxed_str()))))
    }
}

/// A JSON object, its `metadata` member decoded by a visitor that drops `managedFields`
/// (`metadata: true` is that visitor).
struct ObjectVisitor {
    metadata: bool,
}

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if self.metadata && key == "managedFields" {
                access.next_value::<IgnoredAny>()?;
                continue;
            }
            let value = if !self.metadata && key == "metadata" {
                Value::Object(access.next_value::<Metadata>()?.0)
            } else {
                access.next_value::<Value>()?
            };
            out.insert(key, value);
        }
        Ok(out)
    }
}

/// An object's `metadata`, without `managedFields`.
struct Metadata(Map<String, Value>);

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ObjectVisitor { metadata: true })
            .map(Metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_decode_whole_but_for_their_managed_fields() {
        let text = r#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"7"},
            "items":[{"apiVersion":"v1","kind":"ConfigMap",
              "metadata":{"name":"a","namespace":"n","labels":{"x":"1"},
                "managedFields":[{"manager":"driftless","fieldsV1":{"f:data":{}}}]},
              "data":{"k":"v"}},
             {"apiVersion":"v1","kind":"ConfigMap","metadata":{"namespace":"n"}}]}"#;
        let list: ObjectList<Slim> = serde_json::from_str(text).unwrap();
        let by_name: ByName = list.items.into_iter().filter_map(Slim::named).collect();
        assert_eq!(by_name.len(), 1, "an object without a name is left out");
        assert_eq!(
            get(&by_name, "a").unwrap(),
            serde_json::json!({"apiVersion":"v1","kind":"ConfigMap",
                "metadata":{"name":"a","namespace":"n","labels":{"x":"1"}},
                "data":{"k":"v"}})
        );
    }

    #[test]
    fn a_managed_fields_member_outside_metadata_is_kept() {
        let text = r#"{"metadata":{"name":"a"},"data":{"managedFields":"x"}}"#;
        let Slim(Some((name, kept))) = serde_json::from_str(text).unwrap() else {
            panic!("a named object is kept");
        };
        assert_eq!(name, "a");
        let v: Value = serde_json::from_str(&kept).unwrap();
        assert_eq!(v["data"]["managedFields"], "x");
    }
}
