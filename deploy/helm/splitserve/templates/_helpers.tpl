{{/* Names and labels. */}}
{{- define "splitserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "splitserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "splitserve.labels" -}}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The Redis URL every replica and the router use. */}}
{{- define "splitserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis-0.%s-redis.%s.svc:6379/0" (include "splitserve.fullname" .) (include "splitserve.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "redis.externalUrl: set it when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.tenantsSecret" -}}
{{- default (printf "%s-tenants" (include "splitserve.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The application config: values.app with what the cluster decides filled in. The same
schema as `splitserve up --config` (splitserve/app_config.py). */}}
{{- define "splitserve.appConfig" -}}
{{- $app := deepCopy .Values.app -}}
{{- $_ := set $app "redis" (include "splitserve.redisUrl" .) -}}
{{- $_ := set $app "http" (dict "host" "0.0.0.0" "port" (int .Values.service.httpPort)) -}}
{{- $_ := set $app "grpc" (dict "host" "0.0.0.0" "port" (int .Values.service.grpcPort)) -}}
{{- $auth := dict "enabled" .Values.auth.enabled -}}
{{- if .Values.auth.enabled -}}
{{- $_ := set $auth "tenants_file" "/etc/splitserve/tenants/tenants.yaml" -}}
{{- end -}}
{{- $_ := set $app "auth" $auth -}}
{{- $_ := set $app "metrics" (dict "port" (int .Values.monitoring.port)) -}}
{{- $router := deepCopy (default dict $app.router) -}}
{{- $_ := set $router "resources" (dict "splitserve_router" 1) -}}
{{- $_ := set $app "router" $router -}}
{{- toYaml $app -}}
{{- end -}}

{{/* Labels every Ray pod carries (the PodMonitor and the PDBs select by them). */}}
{{- define "splitserve.rayPodLabels" -}}
{{ include "splitserve.labels" . }}
app.kubernetes.io/component: ray
splitserve.io/metrics: "true"
{{- end -}}

{{/* A Ray pod's annotations: scrape annotations plus the group's own (root, extra). */}}
{{- define "splitserve.rayPodAnnotations" -}}
{{- $out := dict -}}
{{- if .root.Values.monitoring.scrapeAnnotations -}}
{{- $_ := set $out "prometheus.io/scrape" "true" -}}
{{- $_ := set $out "prometheus.io/port" (toString .root.Values.monitoring.port) -}}
{{- $_ := set $out "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- toYaml (merge $out (default dict .extra)) -}}
{{- end -}}

{{/* rayStartParams as KubeRay takes them: every value a string (params, extra). */}}
{{- define "splitserve.rayStartParams" -}}
{{- $out := dict -}}
{{- range $k, $v := (default dict .params) -}}
{{- $_ := set $out $k (toString $v) -}}
{{- end -}}
{{- toYaml (merge $out (default dict .extra)) -}}
{{- end -}}

{{/* Environment, volumes and mounts shared by head and workers. */}}
{{- define "splitserve.env" -}}
- name: SPLITSERVE_BIND_HOST
  value: 0.0.0.0
- name: SPLITSERVE_HOME
  value: {{ printf "%s/.splitserve" .Values.modelStore.mountPath | quote }}
- name: RAY_SERVE_ENABLE_EXPERIMENTAL_STREAMING
  value: "1"
# HTTP through HAProxy straight to the router replicas' own servers, not Serve's Python proxy
# (~8 ms less a request: bench/gpu_stack.py, docs/benchmarks.md). ray.env may turn it off.
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
# Replica code on the replica's main event loop: no thread hop per ASGI message or gRPC piece.
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "splitserve.volumeMounts" -}}
- name: models
  mountPath: {{ .Values.modelStore.mountPath }}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.auth.enabled }}
- name: tenants
  mountPath: /etc/splitserve/tenants
  readOnly: true
{{- end }}
{{- end -}}

{{- define "splitserve.volumes" -}}
{{- $shm := .shmSize | default "2Gi" -}}
{{- with .root -}}
- name: models
{{- if eq .Values.modelStore.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "modelStore.claimName: set it for modelStore.type pvc" .Values.modelStore.claimName }}
{{- else if eq .Values.modelStore.type "hostPath" }}
  hostPath:
    path: {{ required "modelStore.hostPath: set it for modelStore.type hostPath" .Values.modelStore.hostPath }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelStore.sizeLimit }}
{{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $shm }}
{{- if .Values.auth.enabled }}
- name: tenants
  secret:
    secretName: {{ include "splitserve.tenantsSecret" . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* modelStore.type pull: one init container fetching every listed model. */}}
{{- define "splitserve.initContainers" -}}
{{- if and (eq .Values.modelStore.type "pull") .Values.modelStore.pull }}
initContainers:
  - name: pull-models
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["/bin/sh", "-ec"]
    args:
      - |
        {{- range .Values.modelStore.pull }}
        splitserve models pull {{ . | quote }} --out {{ printf "%s/%s" $.Values.modelStore.mountPath . | quote }}
        {{- end }}
    env:
      {{- include "splitserve.env" . | nindent 6 }}
    volumeMounts:
      - name: models
        mountPath: {{ .Values.modelStore.mountPath }}
{{- end }}
{{- end -}}
