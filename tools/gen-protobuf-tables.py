#!/usr/bin/env python3
"""Generate src/apiserver/protobuf/tables.rs: protobuf field tables for the
built-in kinds the embedded API server decodes and encodes as
application/vnd.kubernetes.protobuf.

Field numbers and wire types come from the prost code of the `k8s-pb` crate
(generated from Kubernetes' generated.proto files); JSON field names from
the `k8s-openapi` crate (the serde names of the same structs). Usage:

    tools/gen-protobuf-tables.py K8S_PB_SRC K8S_OPENAPI_SRC/v1_37 > src/apiserver/protobuf/tables.rs
"""
import os
import re
import sys

PB, OA = sys.argv[1], sys.argv[2]

# (apiVersion, kind, module, struct) decoded and encoded.
ROOTS = [
    ("v1", "Namespace", "api/core/v1", "Namespace"),
    ("v1", "ConfigMap", "api/core/v1", "ConfigMap"),
    ("v1", "Secret", "api/core/v1", "Secret"),
    ("v1", "ServiceAccount", "api/core/v1", "ServiceAccount"),
    ("v1", "Service", "api/core/v1", "Service"),
    ("v1", "Event", "api/core/v1", "Event"),
    ("apps/v1", "Deployment", "api/apps/v1", "Deployment"),
    ("apps/v1", "DaemonSet", "api/apps/v1", "DaemonSet"),
    ("coordination.k8s.io/v1", "Lease", "api/coordination/v1", "Lease"),
    ("events.k8s.io/v1", "Event", "api/events/v1", "Event"),
    ("rbac.authorization.k8s.io/v1", "Role", "api/rbac/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "api/rbac/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", "api/rbac/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "api/rbac/v1", "ClusterRoleBinding"),
    ("autoscaling/v1", "Scale", "api/autoscaling/v1", "Scale"),
    ("meta.k8s.io/v1", "DeleteOptions", "apimachinery/pkg/apis/meta/v1", "DeleteOptions"),
    ("v1", "DeleteOptions", "apimachinery/pkg/apis/meta/v1", "DeleteOptions"),
    ("meta.k8s.io/v1", "Status", "apimachinery/pkg/apis/meta/v1", "Status"),
    ("v1", "Status", "apimachinery/pkg/apis/meta/v1", "Status"),
]
# List kinds: (apiVersion, kind, module, struct) encoded for list responses.
LISTS = [(av, k + "List", m, s + "List") for (av, k, m, s) in ROOTS
         if k not in ("DeleteOptions", "Status", "Scale")]

# Messages with a JSON form of their own.
SPECIAL = {
    ("apimachinery/pkg/apis/meta/v1", "Time"): "Time",
    ("apimachinery/pkg/apis/meta/v1", "MicroTime"): "MicroTime",
    ("apimachinery/pkg/apis/meta/v1", "Duration"): "Duration",
    ("apimachinery/pkg/apis/meta/v1", "FieldsV1"): "RawJson",
    ("apimachinery/pkg/runtime", "RawExtension"): "RawJson",
    ("apimachinery/pkg/api/resource", "Quantity"): "Quantity",
    ("apimachinery/pkg/util/intstr", "IntOrString"): "IntOrString",
}

# Scalar fields that are pointers in Go (`*int32`, `*bool`, `*string`):
# their zero value is meaningful and kept. Every other scalar is written by
# gogo-protobuf even when empty and is omitted from JSON when zero, as Go's
# `omitempty` does. From k8s.io/api types.go.
POINTERS = {
    "ObjectMeta": {"deletionGracePeriodSeconds"},
    "ServiceAccount": {"automountServiceAccountToken"},
    "ConfigMap": {"immutable"}, "Secret": {"immutable"},
    "PodSpec": {"terminationGracePeriodSeconds", "activeDeadlineSeconds",
                "automountServiceAccountToken", "shareProcessNamespace", "priority",
                "enableServiceLinks", "setHostnameAsFQDN", "hostUsers"},
    "SecurityContext": {"privileged", "runAsUser", "runAsGroup", "runAsNonRoot",
                        "readOnlyRootFilesystem", "allowPrivilegeEscalation", "procMount"},
    "PodSecurityContext": {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup",
                           "fsGroupChangePolicy", "supplementalGroupsPolicy"},
    "Probe": {"terminationGracePeriodSeconds"},
    "ConfigMapVolumeSource": {"defaultMode", "optional"},
    "SecretVolumeSource": {"defaultMode", "optional"},
    "ProjectedVolumeSource": {"defaultMode"},
    "DownwardAPIVolumeSource": {"defaultMode"},
    "KeyToPath": {"mode"}, "DownwardAPIVolumeFile": {"mode"},
    "ConfigMapKeySelector": {"optional"}, "SecretKeySelector": {"optional"},
    "ConfigMapEnvSource": {"optional"}, "SecretEnvSource": {"optional"},
    "ConfigMapProjection": {"optional"}, "SecretProjection": {"optional"},
    "ServiceAccountTokenProjection": {"expirationSeconds"},
    "ServiceSpec": {"allocateLoadBalancerNodePorts", "ipFamilyPolicy",
                    "loadBalancerClass", "internalTrafficPolicy", "trafficDistribution"},
    "ClientIPConfig": {"timeoutSeconds"},
    "DeploymentSpec": {"replicas", "revisionHistoryLimit", "progressDeadlineSeconds"},
    "DaemonSetSpec": {"revisionHistoryLimit"},
    "DeploymentStatus": {"terminatingReplicas"},
    "LeaseSpec": {"holderIdentity", "leaseDurationSeconds", "leaseTransitions",
                  "strategy", "preferredHolder"},
    "DeleteOptions": {"gracePeriodSeconds", "orphanDependents", "propagationPolicy",
                      "ignoreStoreReadErrorWithClusterBreakingPotential"},
    "Preconditions": {"uid", "resourceVersion"},
    "ListMeta": {"remainingItemCount"},
    "Container": {"restartPolicy"},
    "EphemeralContainerCommon": {"restartPolicy"},
    "ContainerPort": set(),
    "HTTPGetAction": set(),
}


def module_files():
    for root, _, files in os.walk(PB):
        for fn in files:
            if fn == "mod.rs":
                rel = os.path.relpath(root, PB)
                if rel != ".":
                    yield rel, os.path.join(root, fn)


FIELD_RE = re.compile(r'#\[prost\(([^\]]*)\)\]')


def parse_module(path):
    src = open(path).read()
    structs = {}
    for m in re.finditer(r'pub struct (\w+) \{(.*?)\n\}', src, re.S):
        name, body = m.group(1), m.group(2)
        fields = []
        lines = body.split("\n")
        i = 0
        while i < len(lines):
            fm = FIELD_RE.search(lines[i])
            if fm:
                attr = fm.group(1)
                j = i + 1
                decl = ""
                while True:
                    decl += lines[j].strip()
                    if decl.endswith(",") and decl.count("<") == decl.count(">"):
                        break
                    j += 1
                dm = re.match(r'pub (r#)?(\w+):\s*(.*),$', decl)
                fields.append((attr, dm.group(2), dm.group(3)))
                i = j
            i += 1
        structs[name] = fields
    return structs


MODULES = {rel: parse_module(p) for rel, p in module_files()}


def resolve(module, ty):
    """The (module, struct) a Rust type path in `module` names."""
    ty = re.sub(r',\s*>', '>', ty)
    for wrap in ("::core::option::Option<", "::prost::alloc::vec::Vec<"):
        if ty.startswith(wrap):
            ty = ty[len(wrap):-1]
    if "BTreeMap<" in ty:
        ty = ty.split(",", 1)[1].strip()[:-1].strip()
    parts = ty.split("::")
    mod = module.split("/")
    while parts and parts[0] == "super":
        parts.pop(0)
        mod.pop()
    return ("/".join(mod + parts[:-1]), parts[-1])


def openapi_names(module, struct):
    """JSON field names of the k8s-openapi struct, keyed by normalised name."""
    d = os.path.join(OA, module)
    names = {}
    if os.path.isdir(d):
        for fn in os.listdir(d):
            p = os.path.join(d, fn)
            if not fn.endswith(".rs"):
                continue
            s = open(p).read()
            sm = re.search(r'pub struct (\w+) ?[{(]', s)
            if sm and norm(sm.group(1)) == norm(struct):
                for jm in re.finditer(r'"([A-Za-z0-9$_-]+)" => Field::Key_', s):
                    names[norm(jm.group(1))] = jm.group(1)
                break
    return names


GLOBAL = {}
for _root, _, _files in os.walk(OA):
    for _fn in _files:
        if _fn.endswith(".rs"):
            for _jm in re.finditer(r'"([A-Za-z0-9$_-]+)" => Field::Key_', open(os.path.join(_root, _fn)).read()):
                GLOBAL.setdefault(_jm.group(1).replace("_", "").lower(), _jm.group(1))


def norm(s):
    return s.replace("_", "").lower()


def camel(s):
    p = s.split("_")
    return p[0] + "".join(x[:1].upper() + x[1:] for x in p[1:])


def ident(module, struct):
    snake = re.sub(r'([a-z0-9])([A-Z])', r'\1_\2', struct).upper()
    return "M_" + re.sub(r'[^A-Za-z0-9]', "_", module.replace("apimachinery/pkg/", "").replace("api/", "")).upper() + "_" + snake


order, seen = [], set()


def visit(module, struct):
    key = (module, struct)
    if key in seen or key in SPECIAL:
        return
    seen.add(key)
    for attr, _, ty in MODULES[module][struct]:
        if attr.startswith("message") or "message" in attr.split(",")[0]:
            visit(*resolve(module, ty))
    order.append(key)


for (_, _, m, s) in ROOTS + LISTS:
    visit(m, s)

out = ["// @generated by tools/gen-protobuf-tables.py from k8s-pb 0.9.0 (field numbers)",
       "// and k8s-openapi 0.29 v1_37 (JSON names). Do not edit by hand.",
       "",
       "use super::{Desc, F, K};",
       ""]
for (module, struct) in order:
    jnames = openapi_names(module, struct)
    ptrs = next((v for k, v in POINTERS.items() if norm(k) == norm(struct)), set())
    rows = []
    for attr, fname, ty in MODULES[module][struct]:
        a = [x.strip() for x in attr.split(",")]
        tag = int(re.search(r'tag = "(\d+)"', attr).group(1))
        json_name = jnames.get(norm(fname))
        tgt = resolve(module, ty) if a[0] == "message" else None
        if json_name is None and tgt and jnames and all(
                norm(n) in jnames for (_, n, _) in MODULES[tgt[0]][tgt[1]]):
            # A Go embedded struct: inline in JSON, a field in protobuf.
            rows.append(f'        F {{ num: {tag}, name: "", kind: K::Inline(&{ident(*tgt)}), repeated: false, ptr: false }},')
            continue
        if json_name is None:
            json_name = GLOBAL.get(norm(fname))
        if json_name is None:
            json_name = camel(fname)
            sys.stderr.write(f"warning: {module}.{struct}.{fname}: no k8s-openapi name, using {json_name}\n")
        repeated = "repeated" in a
        base = a[0]
        if base.startswith("btree_map"):
            kv = re.search(r'btree_map = "string, (\w+)"', attr).group(1)
            if kv == "string":
                kind = "K::MapStr"
            elif kv == "bytes":
                kind = "K::MapBytes"
            else:
                tgt = resolve(module, ty)
                if SPECIAL.get(tgt) == "Quantity":
                    kind = "K::MapQuantity"
                else:
                    raise SystemExit(f"{module}.{struct}.{fname}: map of {tgt}")
        elif base == "message":
            tgt = resolve(module, ty)
            kind = f"K::{SPECIAL[tgt]}" if tgt in SPECIAL else f"K::Msg(&{ident(*tgt)})"
            if kind == "K::Duration":
                raise SystemExit(f"{module}.{struct}.{fname}: Duration has no JSON mapping here yet")
        elif base.startswith("bytes"):
            kind = "K::Bytes"
        else:
            kind = {"string": "K::Str", "bool": "K::Bool", "int32": "K::Int", "int64": "K::Int"}.get(base)
            if kind is None:
                raise SystemExit(f"{module}.{struct}.{fname}: {base} has no JSON mapping here yet")
        ptr = "true" if json_name in ptrs else "false"
        rows.append(f'        F {{ num: {tag}, name: "{json_name}", kind: {kind}, repeated: {str(repeated).lower()}, ptr: {ptr} }},')
    out.append(f"pub(super) static {ident(module, struct)}: Desc = Desc {{")
    out.append(f'    name: "{struct}",')
    out.append("    fields: &[")
    out.extend(rows)
    out.append("    ],")
    out.append("};")

out.append("")
out.append("/// The message of a kind, by apiVersion and kind.")
out.append("pub(super) fn message_for(api_version: &str, kind: &str) -> Option<&'static Desc> {")
out.append("    Some(match (api_version, kind) {")
for (av, k, m, s) in ROOTS + LISTS:
    out.append(f'        ("{av}", "{k}") => &{ident(m, s)},')
out.append("        _ => return None,")
out.append("    })")
out.append("}")
print("\n".join(out))
sys.stderr.write(f"{len(order)} messages\n")
