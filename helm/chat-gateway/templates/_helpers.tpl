{{/* Names, labels and the few rules the chart enforces. */}}

{{- define "chat-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chat-gateway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "chat-gateway.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{/* Name of one component's objects: <fullname>-gateway, <fullname>-worker. */}}
{{- define "chat-gateway.componentName" -}}
{{- printf "%s-%s" (include "chat-gateway.fullname" .ctx | trunc 55 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "chat-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chat-gateway.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of every object; pass a dict with ctx (the root) and component ("" for shared objects). */}}
{{- define "chat-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "chat-gateway.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: chat
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
metadata.annotations: commonAnnotations merged with the object's own (`extra`, which wins).
Call as `  {{- include "chat-gateway.annotations" (dict "ctx" . "extra" $map) }}` right under
metadata; it renders nothing when both are empty.
*/}}
{{- define "chat-gateway.annotations" -}}
{{- $all := merge (dict) (default (dict) .extra) .ctx.Values.commonAnnotations -}}
{{- with $all }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "chat-gateway.image" -}}
{{- $repo := .image.repository -}}
{{- if .image.registry }}{{ $repo = printf "%s/%s" .image.registry .image.repository }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "chat-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chat-gateway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "chat-gateway.secretName" -}}
{{- default (include "chat-gateway.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{/*
The JWT secret: the value if set; else the one already stored in this release's Secret (so an
upgrade does not invalidate every token); else 64 random characters. `lookup` sees nothing in
`helm template` or a dry run, where a fresh secret is generated each time.
*/}}
{{- define "chat-gateway.jwtSecret" -}}
{{- if .Values.auth.jwtSecret -}}
{{- if lt (len .Values.auth.jwtSecret) 32 -}}
{{- fail "auth.jwtSecret must be at least 32 bytes (the gateway refuses a shorter one)" -}}
{{- end -}}
{{- .Values.auth.jwtSecret -}}
{{- else -}}
{{- $key := .Values.auth.secretKeys.jwtSecret -}}
{{- $existing := lookup "v1" "Secret" (include "chat-gateway.namespace" .) (include "chat-gateway.secretName" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data $key) -}}
{{- index $existing.data $key | b64dec -}}
{{- else -}}
{{- randAlphaNum 64 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Soft spread over zones and nodes, unless the component sets its own constraints. */}}
{{- define "chat-gateway.topologySpread" -}}
{{- if .values.topologySpreadConstraints -}}
{{ toYaml .values.topologySpreadConstraints }}
{{- else -}}
{{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
- maxSkew: 1
  topologyKey: {{ . }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "chat-gateway.selectorLabels" (dict "ctx" $.ctx "component" $.component) | nindent 6 }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* An HTTP probe on the internal port; pass dict probe, path. */}}
{{- define "chat-gateway.probe" -}}
httpGet:
  path: {{ .path }}
  port: internal
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* The drain must fit in the grace period: preStop sleep, then up to grace + 2 s (docs/operations.md, Shutdown). */}}
{{- define "chat-gateway.checkGrace" -}}
{{- $g := .Values.gateway -}}
{{- $need := add $g.preStopSleepSeconds $g.config.gateway_shutdown_grace_secs 2 -}}
{{- if le (int $g.terminationGracePeriodSeconds) (int $need) -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must exceed gateway.preStopSleepSeconds + gateway.config.gateway_shutdown_grace_secs + 2 (%v)" $g.terminationGracePeriodSeconds $need) -}}
{{- end -}}
{{- end -}}

{{/*
The external identity provider (auth.externalProvider). The JWKS is always mounted as this file,
whatever its key in the ConfigMap; the gateway reads it once, at start.
*/}}
{{- define "chat-gateway.jwksDir" -}}/etc/chat/jwks{{- end -}}
{{- define "chat-gateway.jwksPath" -}}{{ include "chat-gateway.jwksDir" . }}/jwks.json{{- end -}}

{{- define "chat-gateway.jwksConfigMapName" -}}
{{- default (printf "%s-jwks" (include "chat-gateway.componentName" (dict "ctx" . "component" "gateway"))) .Values.auth.externalProvider.existingConfigMap -}}
{{- end -}}

{{/*
The inline JWKS (JSON text), after the checks the schema also makes
(for `--skip-schema-validation`) and one it cannot: the text must be a JSON object with a
non-empty `keys` list, or the gateway would refuse to start. Renders nothing when disabled or
when the JWKS comes from an existing ConfigMap.
*/}}
{{- define "chat-gateway.jwks" -}}
{{- $p := .Values.auth.externalProvider -}}
{{- if $p.enabled -}}
{{- if not (and (trim (toString $p.issuer)) (trim (toString $p.audience))) -}}
{{- fail "auth.externalProvider.issuer and auth.externalProvider.audience are required when auth.externalProvider.enabled (the gateway refuses to start without them)" -}}
{{- end -}}
{{- if eq (empty $p.jwks) (empty $p.existingConfigMap) -}}
{{- fail "auth.externalProvider: set exactly one of jwks (inline) and existingConfigMap" -}}
{{- end -}}
{{- with $p.jwks -}}
{{- $doc := fromJson . -}}
{{- if or (hasKey $doc "Error") (not (kindIs "slice" (get $doc "keys"))) (empty (get $doc "keys")) -}}
{{- fail "auth.externalProvider.jwks must be a JWKS: a JSON object with a non-empty \"keys\" list" -}}
{{- end -}}
{{- . -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
TLS on the gateways' public port (gateway.tls). The kubernetes.io/tls Secret is mounted as this
directory, whole (no subPath: a subPath mount never sees the Secret's updates), so the files are
tls.crt and tls.key in it.
*/}}
{{- define "chat-gateway.tlsDir" -}}/etc/chat/tls{{- end -}}

{{/*
The rules of gateway.tls, also for `--skip-schema-validation`: a Secret name when enabled, and
no chart Ingress at the same time (it would speak plain HTTP to a port that speaks only TLS).
*/}}
{{- define "chat-gateway.checkTls" -}}
{{- $t := .Values.gateway.tls -}}
{{- if $t.enabled -}}
{{- if not (trim (toString $t.secretName)) -}}
{{- fail "gateway.tls.secretName is required when gateway.tls.enabled (an existing kubernetes.io/tls Secret with tls.crt and tls.key)" -}}
{{- end -}}
{{- if .Values.ingress.enabled -}}
{{- fail "gateway.tls.enabled and ingress.enabled cannot both be on: the chart's Ingress sends plain HTTP to the gateways' public port, which then speaks only TLS. Terminate TLS at the ingress (ingress.tls) or in the gateways without the chart's Ingress (docs/kubernetes.md, TLS)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A setting's value as an environment variable string. YAML numbers reach templates as floats,
which print large whole numbers in exponent form (1000000 as "1e+06"): print those as integers.
*/}}
{{- define "chat-gateway.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . | toString | quote -}}
{{- else -}}
{{- . | toString | quote -}}
{{- end -}}
{{- end -}}
