{{/* The image reference of a component: images.<name>.repository:tag. */}}
{{- define "veil.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{/* Labels of every object; the selectors use app: alone (they never change). */}}
{{- define "veil.labels" -}}
app.kubernetes.io/part-of: veil
{{- end -}}

{{/* The controller's in-cluster address, which is also its TLS server name. */}}
{{- define "veil.controllerHost" -}}
{{- printf "veil-controller.%s.svc" .Release.Namespace -}}
{{- end -}}
