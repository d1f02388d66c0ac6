//! Live objects as the drift checks read them: LISTs decoded straight into JSON, each object
//! by name, without the `metadata.managedFields` that the comparisons never look at (often
//! half of a small object). Decoding skips them, so they are never held: a batch of a sweep
//! lists thousands of objects at once, and this is its largest allocation.

use std::collections::HashMap;
use std::fmt;

use kube::api::{DynamicObject, ListParams};
use kube::core::ObjectList;
use kube::Api;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::state::for_each_page;

/// Live objects of one LIST, by name, as JSON without their managedFields.
pub(super) type ByName = HashMap<String, Value>;

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

/// One object of a LIST as JSON, decoded without `metadata.managedFields`.
#[derive(Clone, Debug)]
struct Slim(Value);

impl Slim {
    fn named(self) -> Option<(String, Value)> {
        let name = self.0["metadata"]["name"].as_str()?.to_string();
        Some((name, self.0))
    }
}

impl<'de> Deserialize<'de> for Slim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ObjectVisitor { metadata: false })
            .map(|m| Slim(Value::Object(m)))
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
            by_name["a"],
            serde_json::json!({"apiVersion":"v1","kind":"ConfigMap",
                "metadata":{"name":"a","namespace":"n","labels":{"x":"1"}},
                "data":{"k":"v"}})
        );
    }

    #[test]
    fn a_managed_fields_member_outside_metadata_is_kept() {
        let text = r#"{"metadata":{"name":"a"},"data":{"managedFields":"x"}}"#;
        let Slim(v) = serde_json::from_str(text).unwrap();
        assert_eq!(v["data"]["managedFields"], "x");
    }
}
