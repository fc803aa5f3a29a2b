{{- define "dra-cpu.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dra-cpu.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "dra-cpu.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "dra-cpu.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dra-cpu.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dra-cpu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dra-cpu.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "dra-cpu.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dra-cpu.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dra-cpu.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The daemon's config file: the user's `config` plus what the chart must keep consistent with its mounts. */}}
{{- define "dra-cpu.config" -}}
{{- $paths := dict
  "driverName" .Values.driverName
  "kubeletRootDir" .Values.kubeletRootDir
  "cdiRoot" .Values.cdiRoot
  "stateDir" .Values.stateDir
  "nriSocket" .Values.nriSocket
  "metricsAddress" (printf "%s:%d" .Values.metricsHost (int .Values.metricsPort))
-}}
{{- merge $paths .Values.config | toYaml -}}
{{- end -}}

{{/* The registration socket's path must fit sun_path (108 bytes with the NUL): fail at install, not at start. */}}
{{- define "dra-cpu.checkSocketPath" -}}
{{- $sock := printf "%s/plugins_registry/%s-reg.sock" (trimSuffix "/" .Values.kubeletRootDir) .Values.driverName -}}
{{- if gt (len $sock) 107 -}}
{{- fail (printf "kubeletRootDir %q: the registration socket %s is %d bytes, more than a unix socket path may have (107)" .Values.kubeletRootDir $sock (len $sock)) -}}
{{- end -}}
{{- end -}}
