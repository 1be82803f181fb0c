{{/* Names, labels and the per-stage pieces every template shares. */}}

{{- define "stagetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stagetune.fullname" -}}
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

{{/* The five stages and their ports: gRPC 50051-50055 and metrics 9471-9475, as `stagetune serve` defaults. */}}
{{- define "stagetune.stages" -}}
ingest: {grpc: 50051, metrics: 9471}
vae: {grpc: 50052, metrics: 9472}
text: {grpc: 50053, metrics: 9473}
trainer: {grpc: 50054, metrics: 9474}
validation: {grpc: 50055, metrics: 9475}
{{- end -}}

{{- define "stagetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stagetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "stagetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "stagetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stagetune
{{- end -}}

{{/* Labels of one component; call with (dict "root" $ "component" "trainer"). */}}
{{- define "stagetune.componentLabels" -}}
{{ include "stagetune.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "stagetune.componentSelector" -}}
{{ include "stagetune.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The pods of the trainer's Kubernetes runs, labelled by stagetune.trainer.kube.objects (not by release). */}}
{{- define "stagetune.trainingPods" -}}
app.kubernetes.io/name: stagetune
app.kubernetes.io/component: training-run
{{- end -}}

{{- define "stagetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "stagetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "stagetune.secretName" -}}
{{- default (printf "%s-auth" (include "stagetune.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "stagetune.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else -}}
{{- printf "http://%s-s3:8333" (include "stagetune.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* STAGETUNE_STORE, as core/store/__init__.py parses it. */}}
{{- define "stagetune.storeUrl" -}}
{{- $path := .Values.s3.bucket -}}
{{- if .Values.s3.prefix }}{{ $path = printf "%s/%s" $path (trimAll "/" .Values.s3.prefix) }}{{ end -}}
{{- $url := printf "s3://%s?endpoint=%s" $path (include "stagetune.s3Endpoint" .) -}}
{{- if .Values.s3.region }}{{ $url = printf "%s&region=%s" $url .Values.s3.region }}{{ end -}}
{{- if .Values.s3.caBundle.configMap }}{{ $url = printf "%s&ca_bundle=/etc/stagetune/s3-ca/%s" $url .Values.s3.caBundle.key }}{{ end -}}
{{- $url -}}
{{- end -}}

{{/* The image of a profile's variant; call with (dict "root" $ "profile" $profile). */}}
{{- define "stagetune.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- printf "%s:%s-%s" .root.Values.image.repository $tag .profile.image -}}
{{- end -}}

{{/*
Affinity of a stage: the user's (stage over global none) with the profile's node expressions ANDed
into every required node-selector term; one term holding only them when the user gave none.
Call with (dict "profile" $profile "affinity" $stage.affinity).
*/}}
{{- define "stagetune.affinity" -}}
{{- $aff := deepCopy (default dict .affinity) -}}
{{- $expressions := concat .profile.matchExpressions (list (dict "key" "kubernetes.io/arch" "operator" "In" "values" (list .profile.arch))) -}}
{{- $node := deepCopy (default dict $aff.nodeAffinity) -}}
{{- $required := deepCopy (default dict (get $node "requiredDuringSchedulingIgnoredDuringExecution")) -}}
{{- $terms := list -}}
{{- range $term := (default list $required.nodeSelectorTerms) -}}
{{- $t := deepCopy $term -}}
{{- $_ := set $t "matchExpressions" (concat (default list $term.matchExpressions) $expressions) -}}
{{- $terms = append $terms $t -}}
{{- end -}}
{{- if not $terms -}}
{{- $terms = list (dict "matchExpressions" $expressions) -}}
{{- end -}}
{{- $_ := set $required "nodeSelectorTerms" $terms -}}
{{- $_ := set $node "requiredDuringSchedulingIgnoredDuringExecution" $required -}}
{{- $_ := set $aff "nodeAffinity" $node -}}
{{- toYaml $aff -}}
{{- end -}}

{{/* Pod security shared by every pod of the chart. */}}
{{- define "stagetune.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/*
The TrainingRuntime the trainer's TrainJobs use: the chart's own (restartPolicy Never, backoffLimit 0, the
trainer's grace period, no API token: Kubeflow's stock torch-distributed restarts failed pods in place, which
hides a failed rank and keeps the default 30 s grace) when trainer.launcher.trainJobRuntime is empty and TrainJobs
may be used: runKind trainjob, or auto on a cluster whose API serves Kubeflow Trainer's TrainingRuntime.
Prints "TrainingRuntime/<name>", the given runtime, or nothing (the launcher's default).
*/}}
{{- define "stagetune.trainJobRuntime" -}}
{{- $l := .Values.trainer.launcher -}}
{{- if and .Values.trainer.enabled $l.enabled (ne $l.runKind "job") -}}
{{- if $l.trainJobRuntime -}}
{{- $l.trainJobRuntime -}}
{{- else if or (eq $l.runKind "trainjob") (.Capabilities.APIVersions.Has "trainer.kubeflow.org/v1alpha1/TrainingRuntime") -}}
TrainingRuntime/{{ include "stagetune.fullname" . }}-training
{{- end -}}
{{- end -}}
{{- end -}}
