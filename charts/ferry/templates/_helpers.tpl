{{/*
The namespace the binaries use for Leases (SYSTEM_NAMESPACE in the code).
The chart installs into it and refuses any other.
*/}}
{{- define "ferry.systemNamespace" -}}ferry-system{{- end }}

{{- define "ferry.checkNamespace" -}}
{{- if ne .Release.Namespace (include "ferry.systemNamespace" .) -}}
{{- fail (printf "install Ferry into the namespace %q (helm install -n %s --create-namespace); the binaries keep their Leases there, not in %q" (include "ferry.systemNamespace" .) (include "ferry.systemNamespace" .) .Release.Namespace) -}}
{{- end -}}
{{- end }}

{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
{{- end }}

{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ferry.controllerServiceAccount" -}}
{{- default (printf "%s-controller" (include "ferry.fullname" .)) .Values.controller.serviceAccount.name }}
{{- end }}

{{- define "ferry.agentServiceAccount" -}}
{{- default (printf "%s-agent" (include "ferry.fullname" .)) .Values.agent.serviceAccount.name }}
{{- end }}

{{- define "ferry.caSecretName" -}}
{{- if eq .Values.pki.mode "existingSecret" }}
{{- required "pki.existingSecret.name is required when pki.mode is existingSecret" .Values.pki.existingSecret.name }}
{{- else }}
{{- printf "%s-ca" (include "ferry.fullname" .) }}
{{- end }}
{{- end }}

{{- define "ferry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "ferry.agentImage" -}}
{{- $repo := default .Values.image.repository .Values.agent.image.repository }}
{{- $tag := .Values.agent.image.tag }}
{{- if not $tag }}
{{- $tag = default .Chart.AppVersion .Values.image.tag }}
{{- if eq .Values.agent.qemu.mode "image" }}
{{- $tag = printf "%s-qemu" $tag }}
{{- else }}
{{- $tag = printf "%s-agent" $tag }}
{{- end }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
