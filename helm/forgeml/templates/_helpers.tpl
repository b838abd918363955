{{/* Names and labels. */}}
{{- define "forgeml.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "forgeml.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Ray pods keep the app.kubernetes.io/name=kuberay label KubeRay gives them (its
head services select on it), so they are told apart by instance and part-of. */}}
{{- define "forgeml.podSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: {{ .Chart.Name }}
{{- end -}}

{{- define "forgeml.labels" -}}
{{ include "forgeml.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The ConfigMap holding job.experiment, mounted at /etc/forgeml in the pods that run
the job's entrypoint. */}}
{{- define "forgeml.experimentConfigMap" -}}
{{- printf "%s-experiment" (include "forgeml.fullname" .) -}}
{{- end -}}

{{/* The retraining RayJob a drift monitor copies, its template ConfigMap (-template)
and its Role. */}}
{{- define "forgeml.retrainName" -}}
{{- printf "%s-retrain" (include "forgeml.fullname" .) -}}
{{- end -}}

{{- define "forgeml.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "forgeml.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "forgeml.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* The restricted Pod Security Standard, for pods and containers. The rayproject
images run as user ray (1000, group 100). */}}
{{- define "forgeml.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "forgeml.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment of every Ray container: S3 access, the gateway's token, forgeml's Ray
settings, and a HOME on the writable /tmp (the root filesystem is read-only). Ray's
token (RAY_AUTH_MODE, RAY_AUTH_TOKEN) is injected by KubeRay from authOptions. */}}
{{- define "forgeml.env" -}}
- name: HOME
  value: /tmp/home
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- with .Values.serving.tokenSecret }}
- name: FORGEML_SERVE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: token
      optional: true
- name: FORGEML_SERVE_TOKEN_FILE
  value: /etc/forgeml-serve/tokens.yaml
{{- end }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "forgeml.envFrom" -}}
{{- with .Values.s3.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end -}}

{{/* Writable places on a read-only root filesystem: /tmp (HOME, caches), /tmp/ray (Ray's
session files, logs and spilled objects; named ray-logs, the volume KubeRay would
otherwise add there without a size limit) and /dev/shm (the object store). */}}
{{- define "forgeml.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: ray-logs
  mountPath: /tmp/ray
- name: shm
  mountPath: /dev/shm
{{- if .experiment }}
- name: experiment
  mountPath: /etc/forgeml
  readOnly: true
{{- end }}
{{- if .root.Values.serving.tokenSecret }}
- name: serve-tokens
  mountPath: /etc/forgeml-serve
  readOnly: true
{{- end }}
{{- if .monitor }}
- name: retrain-template
  mountPath: /etc/forgeml-retrain
  readOnly: true
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end }}
{{- end -}}

{{- define "forgeml.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
- name: ray-logs
  emptyDir:
    sizeLimit: {{ .group.rayTmpSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .group.resources.limits.memory }}
{{- if .experiment }}
- name: experiment
  configMap:
    name: {{ .experiment }}
{{- end }}
{{- with .root.Values.serving.tokenSecret }}
- name: serve-tokens
  secret:
    secretName: {{ . }}
    optional: true
    items:
      - {key: tokens.yaml, path: tokens.yaml}
{{- end }}
{{- if .monitor }}
- name: retrain-template
  configMap:
    name: {{ include "forgeml.retrainName" .root }}-template
{{- end }}
{{- if and (eq .component "head") (or .root.Values.autoscaling.enabled .monitor) }}
{{- /* What automountServiceAccountToken would mount, for the autoscaler alone. */}}
- name: kube-api-access
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - {key: ca.crt, path: ca.crt}
      - downwardAPI:
          items:
            - path: namespace
              fieldRef: {fieldPath: metadata.namespace}
{{- end }}
{{- end -}}

{{/* One Ray pod template. Arguments: root (the chart context), group (head or a worker
group's values), component, gpus, ports, experiment (a ConfigMap name or ""), monitor
(true on the standing cluster's head with retrain.enabled: a drift monitor run there
reads the retraining template and creates RayJobs with the API token). */}}
{{- define "forgeml.podTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "forgeml.podSelectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $root.Values.commonLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "forgeml.serviceAccountName" $root }}
  {{- /* The API token is mounted into the autoscaler sidecar (autoscalerOptions) and,
  with monitor, the head container; never automatically. */}}
  automountServiceAccountToken: false
  securityContext:
    {{- include "forgeml.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .component }}
      image: {{ include "forgeml.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- include "forgeml.containerSecurityContext" $root | nindent 8 }}
      env:
        {{- include "forgeml.env" $root | nindent 8 }}
      {{- include "forgeml.envFrom" $root | nindent 6 }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        requests:
          {{- toYaml .group.resources.requests | nindent 10 }}
        limits:
          {{- toYaml .group.resources.limits | nindent 10 }}
          {{- if .gpus }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
      volumeMounts:
        {{- include "forgeml.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "forgeml.volumes" . | nindent 4 }}
{{- end -}}

{{/* The RayCluster spec shared by the RayCluster, a RayJob's own cluster and the
RayService's cluster. Arguments: root, experiment (ConfigMap name or ""), monitor
(see forgeml.podTemplate). */}}
{{- define "forgeml.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
rayVersion: {{ $values.rayVersion | quote }}
{{- if $values.auth.enabled }}
authOptions:
  mode: token
  secretName: {{ $values.auth.existingSecret }}
{{- end }}
enableInTreeAutoscaling: {{ $values.autoscaling.enabled }}
{{- if $values.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ $values.autoscaling.idleTimeoutSeconds }}
  upscalingMode: {{ $values.autoscaling.upscalingMode }}
  version: {{ $values.autoscaling.version }}
  imagePullPolicy: {{ $values.image.pullPolicy }}
  resources:
    {{- toYaml $values.autoscaling.resources | nindent 4 }}
  securityContext:
    {{- include "forgeml.containerSecurityContext" $root | nindent 4 }}
  env:
    {{- include "forgeml.env" $root | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: ray-logs
      mountPath: /tmp/ray
    - name: kube-api-access
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
{{- end }}
headGroupSpec:
  serviceType: {{ $values.head.serviceType }}
  rayStartParams:
    dashboard-host: 0.0.0.0
    num-cpus: {{ $values.head.numCpus | quote }}
    metrics-export-port: "8080"
  template:
    {{- $ports := list (dict "name" "gcs" "containerPort" 6379) (dict "name" "dashboard" "containerPort" 8265) (dict "name" "client" "containerPort" 10001) (dict "name" "serve" "containerPort" 8000) (dict "name" "metrics" "containerPort" 8080) }}
    {{- include "forgeml.podTemplate" (dict "root" $root "group" $values.head "component" "head" "gpus" 0 "ports" $ports "experiment" .experiment "monitor" .monitor) | nindent 4 }}
workerGroupSpecs:
  {{- range $name := list "cpu" "gpu" }}
  {{- $group := index $values.workers $name }}
  {{- if $group.enabled }}
  - groupName: {{ $name }}
    replicas: {{ $group.replicas }}
    minReplicas: {{ $group.minReplicas }}
    maxReplicas: {{ $group.maxReplicas }}
    {{- with $group.rayLabels }}
    labels:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    rayStartParams:
      metrics-export-port: "8080"
    template:
      {{- $ports := list (dict "name" "serve" "containerPort" 8000) (dict "name" "metrics" "containerPort" 8080) }}
      {{- include "forgeml.podTemplate" (dict "root" $root "group" $group "component" (printf "worker-%s" $name) "gpus" (ternary $group.gpusPerWorker 0 (eq $name "gpu")) "ports" $ports "experiment" $.experiment) | nindent 6 }}
  {{- end }}
  {{- end }}
{{- end -}}


{{/* The spec of a RayJob that trains with the experiment in ConfigMap .experiment: the
chart's job (job.enabled) and the retraining template (retrain.enabled) that a drift
monitor copies. Arguments: root, experiment. */}}
{{- define "forgeml.rayJobSpec" -}}
{{- $root := .root -}}
entrypoint: {{ $root.Values.job.entrypoint | quote }}
submissionMode: {{ $root.Values.job.submissionMode }}
{{- with $root.Values.job.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ . }}
{{- end }}
{{- if $root.Values.job.useClusterSelector }}
{{- if not $root.Values.cluster.enabled }}
{{- fail "job.useClusterSelector needs the chart's RayCluster (cluster.enabled: true)" }}
{{- end }}
clusterSelector:
  ray.io/cluster: {{ include "forgeml.fullname" $root }}
{{- else }}
{{- /* KubeRay refuses retries against a selected cluster, and a TTL without shutdown. */}}
backoffLimit: {{ $root.Values.job.backoffLimit }}
shutdownAfterJobFinishes: {{ $root.Values.job.shutdownAfterJobFinishes }}
{{- if $root.Values.job.shutdownAfterJobFinishes }}
ttlSecondsAfterFinished: {{ $root.Values.job.ttlSecondsAfterFinished }}
{{- end }}
rayClusterSpec:
  {{- include "forgeml.rayClusterSpec" (dict "root" $root "experiment" .experiment) | nindent 2 }}
{{- end }}
{{- if eq $root.Values.job.submissionMode "K8sJobMode" }}
submitterPodTemplate:
  metadata:
    labels:
      {{- include "forgeml.podSelectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: job-submitter
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "forgeml.serviceAccountName" $root }}
    automountServiceAccountToken: false
    securityContext:
      {{- include "forgeml.podSecurityContext" $root | nindent 6 }}
    containers:
      - name: ray-job-submitter
        image: {{ include "forgeml.image" $root }}
        imagePullPolicy: {{ $root.Values.image.pullPolicy }}
        securityContext:
          {{- include "forgeml.containerSecurityContext" $root | nindent 10 }}
        env:
          {{- include "forgeml.env" $root | nindent 10 }}
        resources:
          {{- toYaml $root.Values.job.submitter.resources | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
    volumes:
      - name: tmp
        emptyDir:
          sizeLimit: 1Gi
{{- end }}
{{- end -}}
