//! Admission of a realistic CRD, checked against the texts kube-apiserver
//! returns for the same objects.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionVersion;
use serde_json::{Value, json};

use super::*;

fn crd_version() -> CustomResourceDefinitionVersion {
    serde_json::from_value(json!({
        "name": "v1alpha1", "served": true, "storage": true,
        "schema": {"openAPIV3Schema": {
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["host"],
                    "properties": {
                        "host": {"type": "string", "minLength": 1, "maxLength": 20,
                                  "pattern": "^[a-z0-9-]+$",
                                  "x-kubernetes-validations": [
                                      {"rule": "self == oldSelf", "message": "host is immutable"}]},
                        "replicas": {"type": "integer", "format": "int32", "minimum": 0,
                                      "maximum": 10, "default": 1},
                        "ratio": {"type": "number", "exclusiveMinimum": true, "minimum": 0},
                        "startAt": {"type": "string", "format": "date-time"},
                        "port": {"x-kubernetes-int-or-string": true},
                        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string"},
                                  "x-kubernetes-list-type": "set"},
                        "disks": {"type": "array", "minItems": 1,
                                   "x-kubernetes-list-type": "map",
                                   "x-kubernetes-list-map-keys": ["name"],
                                   "items": {"type": "object", "required": ["name"],
                                             "properties": {
                                                 "name": {"type": "string"},
                                                 "size": {"type": "string", "default": "1Gi"}}}},
                        "bandwidth": {
                            "type": "object",
                            "default": {},
                            "properties": {
                                "mode": {"type": "string", "enum": ["Auto", "Custom"],
                                          "default": "Auto"},
                                "limit": {"type": "integer", "minimum": 1}
                            },
                            "x-kubernetes-validations": [{
                                "rule": "has(self.limit) == (self.mode == 'Custom')",
                                "message": "limit is set exactly when mode is Custom",
                                "fieldPath": ".limit"
                            }]
                        },
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                                   "properties": {"known": {"type": "object",
                                       "properties": {"a": {"type": "string"}}}}},
                        "labels": {"type": "object",
                                    "additionalProperties": {"type": "string", "maxLength": 3}},
                        "note": {"type": "string", "nullable": true},
                        "template": {"type": "object", "x-kubernetes-embedded-resource": true,
                                      "x-kubernetes-preserve-unknown-fields": true}
                    },
                    "x-kubernetes-validations": [{
                        "rule": "!has(self.ratio) || self.ratio < 2.0",
                        "messageExpression": "'ratio ' + string(self.ratio) + ' is too high'",
                        "reason": "FieldValueForbidden"
                    }]
                },
                "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
            }
        }}
    }))
    .unwrap()
}

fn validator() -> Validator {
    Validator::new(&crd_version()).unwrap()
}

fn obj(spec: Value) -> Value {
    json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Widget",
           "metadata": {"name": "w1"}, "spec": spec})
}

fn errors(spec: Value) -> Vec<String> {
    let mut o = obj(spec);
    match validator().admit(&mut o, None, &AdmitOptions::default()) {
        Ok(_) => Vec::new(),
        Err(AdmitError::Invalid(e)) => e.iter().map(ToString::to_string).collect(),
        Err(e) => vec![e.to_string()],
    }
}

#[test]
fn valid_object_is_defaulted_and_admitted() {
    let v = validator();
    let mut o = obj(json!({"host": "h1", "disks": [{"name": "root"}]}));
    v.admit(&mut o, None, &AdmitOptions::default()).unwrap();
    assert_eq!(o["spec"]["replicas"], 1);
    assert_eq!(o["spec"]["bandwidth"], json!({"mode": "Auto"}));
    assert_eq!(o["spec"]["disks"][0]["size"], "1Gi");
}

#[test]
fn unknown_fields_are_pruned_warned_or_rejected() {
    let v = validator();
    let spec = json!({"host": "h", "colour": "red", "extra": {"free": 1, "known": {"a": "x", "b": 2}},
                      "disks": [{"name": "d", "junk": true}]});
    let mut o = obj(spec.clone());
    o["metadata"]["bogus"] = json!(1);
    let a = v.admit(&mut o, None, &AdmitOptions::default()).unwrap();
    assert_eq!(
        a.warnings,
        vec![
            r#"unknown field "metadata.bogus""#,
            r#"unknown field "spec.colour""#,
            r#"unknown field "spec.disks[0].junk""#,
            r#"unknown field "spec.extra.known.b""#,
        ]
    );
    assert!(o["spec"].get("colour").is_none());
    assert_eq!(
        o["spec"]["extra"]["free"], 1,
        "preserve-unknown keeps free fields"
    );
    assert!(o["metadata"].get("bogus").is_none());

    let mut o = obj(spec);
    let strict = AdmitOptions {
        field_validation: FieldValidation::Strict,
    };
    let e = v.admit(&mut o, None, &strict).unwrap_err();
    assert_eq!(e.code(), 400);
    assert_eq!(
        e.status("ferry.dev", "v1alpha1", "Widget", "w1")["message"],
        r#"Widget in version "v1alpha1" cannot be handled as a Widget: strict decoding error: unknown field "spec.colour", unknown field "spec.disks[0].junk", unknown field "spec.extra.known.b""#
    );
}

#[test]
fn enum_range_pattern_and_length_errors_read_like_the_real_server() {
    assert_eq!(
        errors(json!({"host": "h", "bandwidth": {"mode": "Fast"}})),
        vec![
            r#"spec.bandwidth.mode: Unsupported value: "Fast": supported values: "Auto", "Custom""#,
            r#"<nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation"#
        ]
    );
    assert_eq!(
        errors(json!({"host": "h", "replicas": 11})),
        vec![
            "spec.replicas: Invalid value: 11: spec.replicas in body should be less than or equal to 10"
        ]
    );
    assert_eq!(
        errors(json!({"host": "h", "ratio": 0})),
        vec!["spec.ratio: Invalid value: 0: spec.ratio in body should be greater than 0"]
    );
    assert_eq!(
        errors(json!({"host": "Bad_Host"})),
        vec![
            r#"spec.host: Invalid value: "Bad_Host": spec.host in body should match '^[a-z0-9-]+$'"#
        ]
    );
    assert_eq!(
        errors(json!({"host": ""})),
        vec![
            r#"spec.host: Invalid value: "": spec.host in body should be at least 1 chars long"#,
            r#"spec.host: Invalid value: "": spec.host in body should match '^[a-z0-9-]+$'"#
        ]
    );
    assert_eq!(
        errors(json!({"host": "a".repeat(21)}))[0],
        "spec.host: Too long: may not be more than 20 bytes"
    );
    assert_eq!(
        errors(json!({"host": "h", "tags": ["a", "b", "c", "d"]}))[0],
        "spec.tags: Too many: 4: must have at most 3 items"
    );
    assert_eq!(
        errors(json!({"host": "h", "disks": []})),
        vec!["spec.disks: Invalid value: 0: spec.disks in body should have at least 1 items"]
    );
    assert_eq!(
        errors(json!({"host": "h", "labels": {"k": "long"}}))[0],
        "spec.labels.k: Too long: may not be more than 3 bytes"
    );
}

#[test]
fn types_formats_and_required_fields_are_checked() {
    assert_eq!(
        errors(json!({"replicas": "three"})),
        vec![
            "spec.host: Required value",
            r#"spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string""#,
            r#"<nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation"#
        ]
    );
    assert_eq!(
        errors(json!({"host": "h", "startAt": "tomorrow"}))[0],
        r#"spec.startAt: Invalid value: "tomorrow": spec.startAt in body must be of type date-time: "tomorrow""#
    );
    assert!(
        errors(json!({"host": "h", "startAt": "2026-01-01T00:00:00Z", "port": "http"})).is_empty()
    );
    assert!(errors(json!({"host": "h", "port": 8080})).is_empty());
    assert_eq!(
        errors(json!({"host": "h", "port": true}))[0],
        r#"spec.port: Invalid value: "boolean": spec.port in body must be of type integer,string: "boolean""#
    );
    assert_eq!(
        errors(json!({"host": "h", "replicas": 3_000_000_000u64}))[0],
        r#"spec.replicas: Invalid value: 3000000000: spec.replicas in body should be less than or equal to 10"#
    );
}

#[test]
fn nulls_are_dropped_defaulted_or_kept_when_nullable() {
    let v = validator();
    let mut o = obj(json!({"host": "h", "replicas": null, "ratio": null, "note": null}));
    v.admit(&mut o, None, &AdmitOptions::default()).unwrap();
    assert_eq!(
        o["spec"]["replicas"], 1,
        "null with a default takes the default"
    );
    assert!(
        o["spec"].get("ratio").is_none(),
        "null without default is dropped"
    );
    assert_eq!(o["spec"]["note"], Value::Null, "nullable keeps null");
}

#[test]
fn list_type_set_and_map_reject_duplicates() {
    assert_eq!(
        errors(json!({"host": "h", "tags": ["a", "a"]})),
        vec![r#"spec.tags[1]: Duplicate value: "a""#]
    );
    assert_eq!(
        errors(json!({"host": "h", "disks": [{"name": "d"}, {"name": "d"}]})),
        vec![r#"spec.disks[1]: Duplicate value: {"name":"d"}"#]
    );
}

#[test]
fn cel_cross_field_rule_reports_on_its_field_path() {
    assert_eq!(
        errors(json!({"host": "h", "bandwidth": {"mode": "Custom"}})),
        vec![
            r#"spec.bandwidth.limit: Invalid value: "object": limit is set exactly when mode is Custom"#
        ]
    );
    assert!(errors(json!({"host": "h", "bandwidth": {"mode": "Custom", "limit": 5}})).is_empty());
    assert_eq!(
        errors(json!({"host": "h", "bandwidth": {"limit": 5}})).len(),
        1,
        "limit without Custom mode (defaulted to Auto) is refused"
    );
}

#[test]
fn cel_message_expression_and_reason() {
    assert_eq!(
        errors(json!({"host": "h", "ratio": 2.5})),
        vec!["spec: Forbidden: ratio 2.5 is too high"]
    );
}

#[test]
fn transition_rule_runs_only_on_update() {
    let v = validator();
    let mut old = obj(json!({"host": "h1"}));
    v.admit(&mut old, None, &AdmitOptions::default()).unwrap();
    let mut same = obj(json!({"host": "h1", "replicas": 3}));
    v.admit(&mut same, Some(&old), &AdmitOptions::default())
        .unwrap();
    let mut changed = obj(json!({"host": "h2"}));
    let e = v
        .admit(&mut changed, Some(&old), &AdmitOptions::default())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"spec.host: Invalid value: "string": host is immutable"#
    );
    let status = e.status("ferry.dev", "v1alpha1", "Widget", "w1");
    assert_eq!(
        status["message"],
        r#"Widget.ferry.dev "w1" is invalid: spec.host: Invalid value: "string": host is immutable"#
    );
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "FieldValueInvalid"
    );
    assert_eq!(status["details"]["causes"][0]["field"], "spec.host");
}

#[test]
fn metadata_name_and_embedded_resources_are_validated() {
    let v = validator();
    let mut o = obj(json!({"host": "h"}));
    o["metadata"]["name"] = json!("Bad_Name");
    let e = v.admit(&mut o, None, &AdmitOptions::default()).unwrap_err();
    assert!(e.to_string().starts_with(
        r#"metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain"#
    ));
    assert_eq!(
        errors(json!({"host": "h", "template": {"metadata": {"name": "x"}, "spec": {"a": 1}}})),
        vec![
            "spec.template.apiVersion: Required value: must not be empty",
            "spec.template.kind: Required value: must not be empty",
            r#"<nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation"#
        ]
    );
    let mut o = obj(
        json!({"host": "h", "template": {"apiVersion": "v1", "kind": "Pod",
                                                     "metadata": {"name": "p", "junk": 1}}}),
    );
    let a = v.admit(&mut o, None, &AdmitOptions::default()).unwrap();
    assert_eq!(
        a.warnings,
        vec![r#"unknown field "spec.template.metadata.junk""#]
    );
}

#[test]
fn defaults_apply_on_read() {
    let v = validator();
    let mut stored = obj(json!({"host": "h"}));
    v.apply_defaults(&mut stored);
    assert_eq!(stored["spec"]["replicas"], 1);
}

#[test]
fn bad_schemas_fail_to_compile() {
    let e = Validator::from_schema(&json!({"type": "object", "properties": {
        "a": {"type": "string", "pattern": "("}}}))
    .unwrap_err();
    assert!(matches!(e, SchemaError::Pattern { .. }));
    let e = Validator::from_schema(&json!({"type": "object",
        "x-kubernetes-validations": [{"rule": "self.a ==="}]}))
    .unwrap_err();
    assert!(matches!(e, SchemaError::Rule(_)));
}

#[test]
fn validators_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Validator>();
}

#[test]
fn unchanged_invalid_values_are_ratcheted_on_update() {
    let v = validator();
    // Stored before the schema tightened: replicas out of range, a bad mode.
    let old = obj(json!({"host": "h", "replicas": 50, "bandwidth": {"mode": "Custom"}}));
    let mut update = old.clone();
    update["spec"]["tags"] = json!(["new"]);
    v.admit(&mut update, Some(&old), &AdmitOptions::default())
        .expect("errors on untouched fields are ratcheted");
    let mut touched = old.clone();
    touched["spec"]["replicas"] = json!(60);
    let e = v
        .admit(&mut touched, Some(&old), &AdmitOptions::default())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "spec.replicas: Invalid value: 60: spec.replicas in body should be less than or equal to 10"
    );
    // Touching the node of a cross-field rule re-evaluates it.
    let mut cross = old.clone();
    cross["spec"]["bandwidth"]["limit"] = json!(0);
    let e = v
        .admit(&mut cross, Some(&old), &AdmitOptions::default())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "spec.bandwidth.limit: Invalid value: 0: spec.bandwidth.limit in body should be greater than or equal to 1"
    );
}

#[test]
fn ratcheting_judges_cel_rules_by_their_declaring_node() {
    let v = validator();
    let mut old = obj(json!({"host": "h"}));
    v.admit(&mut old, None, &AdmitOptions::default()).unwrap();
    // The rule reports on .limit, absent before and after; but its node
    // (bandwidth) changed, so it is evaluated and fails.
    let mut update = old.clone();
    update["spec"]["bandwidth"]["mode"] = json!("Custom");
    let e = v
        .admit(&mut update, Some(&old), &AdmitOptions::default())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"spec.bandwidth.limit: Invalid value: "object": limit is set exactly when mode is Custom"#
    );
}

#[test]
fn transition_rules_in_map_list_items_see_the_item_with_the_same_key() {
    let v = Validator::from_schema(&json!({"type": "object", "properties": {
        "metadata": {"type": "object"},
        "spec": {"type": "object", "properties": {"disks": {
            "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
            "x-kubernetes-validations": [{"rule": "size(self) <= 3", "message": "at most 3 disks"}],
            "items": {"type": "object", "properties": {
                "name": {"type": "string"},
                "size": {"type": "string", "x-kubernetes-validations": [
                    {"rule": "self == oldSelf", "message": "size is immutable"}]}}}}}}}}))
    .unwrap();
    let mk = |disks: Value| json!({"metadata": {"name": "x"}, "spec": {"disks": disks}});
    let old = mk(json!([{"name": "a", "size": "1"}, {"name": "b", "size": "2"}]));
    // Reordered and a new disk inserted first: no size changed.
    let mut reordered = mk(
        json!([{"name": "c", "size": "9"}, {"name": "b", "size": "2"}, {"name": "a", "size": "1"}]),
    );
    v.admit(&mut reordered, Some(&old), &AdmitOptions::default())
        .expect("items are matched by name, a new item has no oldSelf");
    let mut changed = mk(json!([{"name": "b", "size": "2"}, {"name": "a", "size": "5"}]));
    let e = v
        .admit(&mut changed, Some(&old), &AdmitOptions::default())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"spec.disks[1].size: Invalid value: "string": size is immutable"#
    );
    let mut too_many = mk(
        json!([{"name": "a", "size": "1"}, {"name": "b", "size": "2"},
                                 {"name": "c", "size": "3"}, {"name": "d", "size": "4"}]),
    );
    let e = v
        .admit(&mut too_many, Some(&old), &AdmitOptions::default())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"spec.disks: Invalid value: "array": at most 3 disks"#
    );
}

#[test]
fn rules_that_fail_to_evaluate_say_why() {
    let v = Validator::from_schema(&json!({"type": "object", "properties": {
        "metadata": {"type": "object"},
        "spec": {"type": "object", "properties": {"limit": {"type": "integer"}},
            "x-kubernetes-validations": [{"rule": "self.limit > 0", "message": "limit must be positive"}]}}}))
    .unwrap();
    let mut o = json!({"metadata": {"name": "x"}, "spec": {}});
    let e = v.admit(&mut o, None, &AdmitOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"spec: Invalid value: "object": no such key: limit evaluating rule: limit must be positive"#
    );
}

fn crd_with(
    schema: Value,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    serde_json::from_value(json!({
        "metadata": {"name": "widgets.ferry.dev"},
        "spec": {"group": "ferry.dev", "scope": "Namespaced",
                 "names": {"kind": "Widget", "plural": "widgets"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": schema}}]}
    }))
    .unwrap()
}

#[test]
fn crds_with_non_structural_schemas_are_refused_like_the_real_server() {
    let mut version = crd_version();
    version.name = "v1".into();
    let mut good = crd_with(json!({}));
    good.spec.versions = vec![version];
    assert_eq!(validate_crd(&good), Vec::new());

    let bad = crd_with(json!({"type": "object", "properties": {
        "spec": {"properties": {"x": {"type": "string"}}},
        "list": {"type": "array"},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
        "mode": {"type": "string", "enum": ["A"], "default": "B"},
        "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}},
        "mixed": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}}
    }}));
    let texts: Vec<String> = validate_crd(&bad).iter().map(ToString::to_string).collect();
    let p = "spec.versions[0].schema.openAPIV3Schema";
    for want in [
        format!(
            "{p}.properties[spec].type: Required value: must not be empty for specified object fields"
        ),
        format!("{p}.properties[list].items: Required value: must be specified"),
        format!(
            "{p}.properties[tags].uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic"
        ),
        format!(r#"{p}.properties[mode].default: Unsupported value: "B": supported values: "A""#),
        format!(
            "{p}.properties[metadata]: Forbidden: must not specify anything other than name and generateName, but metadata is implicitly specified"
        ),
        format!(
            "{p}.properties[mixed].additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"
        ),
    ] {
        assert!(texts.contains(&want), "missing {want}\n in {texts:#?}");
    }

    let mut misnamed = crd_with(json!({"type": "array", "items": {"type": "string"}}));
    misnamed.metadata.name = Some("widget.ferry.dev".into());
    let texts: Vec<String> = validate_crd(&misnamed)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(texts.contains(&r#"metadata.name: Invalid value: "widget.ferry.dev": must be spec.names.plural+"."+spec.group"#.to_string()), "{texts:?}");
    assert!(
        texts.contains(&format!(
            r#"{p}.type: Invalid value: "array": must be object at the root"#
        )),
        "{texts:?}"
    );

    let bad_rule =
        crd_with(json!({"type": "object", "x-kubernetes-validations": [{"rule": "self.a ==="}]}));
    let errs = validate_crd(&bad_rule);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].field, format!("{p}.x-kubernetes-validations"));
}

#[test]
fn metadata_that_is_not_object_meta_is_a_bad_request() {
    let v = validator();
    let mut o = obj(json!({"host": "h"}));
    o["metadata"]["labels"] = json!({"a": 1});
    let e = v.admit(&mut o, None, &AdmitOptions::default()).unwrap_err();
    assert_eq!(e.code(), 400);
    let s = e.status("ferry.dev", "v1alpha1", "Widget", "w1");
    assert!(
        s["message"].as_str().unwrap().starts_with(r#"Widget in version "v1alpha1" cannot be handled as a Widget: metadata: invalid type: integer `1`, expected a string"#),
        "{s}"
    );
}
