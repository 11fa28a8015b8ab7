{{/* Chart name. */}}
{{- define "careloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; components append "-api", "-worker-intake", ... */}}
{{- define "careloop.fullname" -}}
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

{{- define "careloop.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Selector labels. Call with (dict "ctx" $ "component" "api"). */}}
{{- define "careloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "careloop.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Common labels. Call with (dict "ctx" $ "component" "api"). */}}
{{- define "careloop.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "careloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: careloop
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{/* Environment of every careloop container (root context). */}}
{{- define "careloop.env" -}}
- name: CARELOOP_CONFIG
  value: /etc/careloop/careloop.toml
- name: CARELOOP_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.database.name }}
      key: {{ .Values.secrets.database.key }}
- name: CARELOOP_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.broker.name }}
      key: {{ .Values.secrets.broker.key }}
- name: CARELOOP_BASE_URL
  value: {{ .Values.baseUrl | quote }}
- name: CARELOOP_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: CARELOOP_LOG_FORMAT
  value: json
{{- if .Values.keys.existingSecret }}
- name: CARELOOP_KEYS_DIR
  value: /app/keys
{{- end }}
{{- range .Values.secrets.env }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volume mounts of every careloop container (root context). */}}
{{- define "careloop.volumeMounts" -}}
- name: config
  mountPath: /etc/careloop
  readOnly: true
- name: var
  mountPath: /app/var
- name: tmp
  mountPath: /tmp
{{- if .Values.keys.existingSecret }}
- name: keys
  mountPath: /app/keys
  readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes of every careloop pod (root context). readOnlyRootFilesystem: /app/var and /tmp
are emptyDirs. */}}
{{- define "careloop.volumes" -}}
- name: config
  configMap:
    name: {{ include "careloop.fullname" . }}-config
- name: var
  emptyDir:
    sizeLimit: {{ .Values.varSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.keys.existingSecret }}
- name: keys
  secret:
    secretName: {{ .Values.keys.existingSecret }}
    defaultMode: 0440  # group-readable: the group is fsGroup (10001)
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every careloop pod (root context). */}}
{{- define "careloop.podSpec" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod annotations: roll the pods when the configuration changes (root context). */}}
{{- define "careloop.podAnnotations" -}}
checksum/config: {{ .Values.config | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* `careloop serve` arguments (root context). */}}
{{- define "careloop.serveArgs" -}}
- serve
- --host
- 0.0.0.0
- --mllp-host
- 0.0.0.0
{{- if .Values.migrations.enabled }}
- --no-upgrade
{{- end }}
{{- end -}}

{{/* HTTP probes on /health/live and /health/ready (root context). */}}
{{- define "careloop.probes" -}}
livenessProbe:
  httpGet:
    path: {{ .Values.probes.liveness.path }}
    port: http
  initialDelaySeconds: {{ .Values.probes.liveness.initialDelaySeconds }}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: {{ .Values.probes.readiness.path }}
    port: http
  initialDelaySeconds: {{ .Values.probes.readiness.initialDelaySeconds }}
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
{{- end -}}
