package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	securityv1beta1 "istio.io/api/security/v1beta1"
	"sigs.k8s.io/yaml"
)

// Manifest is what Parse found in one file.
type Manifest struct {
	// Objects are the security.istio.io objects that decoded cleanly. They are not validated yet;
	// see Validate.
	Objects []*Object
	// Workloads come from Pod objects in the file (labels, service account, pod IPs).
	Workloads []*Workload
	// Skipped lists, as "file:line: apiVersion kind namespace/name", the documents of other kinds
	// (Namespace, Service, Deployment, ...) that Parse ignored, so a mixed directory loads.
	Skipped []string
	// Errors holds one *ObjectError per document that could not be decoded (YAML syntax, unknown
	// fields, wrong types, unsupported apiVersion). Such a document is dropped; the others load.
	Errors []error
}

const securityGroup = "security.istio.io"

// Parse decodes a kubectl-style, multi-document YAML manifest. file names the source in errors.
// Documents of kind List are unpacked. Parse never panics on any input and is safe for concurrent
// use.
func Parse(file string, data []byte) *Manifest {
	m := &Manifest{}
	for _, d := range splitDocuments(data) {
		src := file + ":" + strconv.Itoa(d.line)
		js, err := yaml.YAMLToJSONStrict(d.text)
		if err != nil {
			m.Errors = append(m.Errors, &ObjectError{Source: src, Err: &kindError{ErrSyntax, "yaml: " + trimYAMLError(err)}})
			continue
		}
		js = bytes.TrimSpace(js)
		if len(js) == 0 || string(js) == "null" {
			continue
		}
		m.decodeDocument(src, js)
	}
	return m
}

type document struct {
	line int // 1-based line of the document's first line
	text []byte
}

// splitDocuments splits a YAML stream at "---" separator lines, as kubectl does.
func splitDocuments(data []byte) []document {
	var docs []document
	start, startLine, line := 0, 1, 1
	for i := 0; i <= len(data); {
		j := bytes.IndexByte(data[i:], '\n')
		end := len(data)
		if j >= 0 {
			end = i + j
		}
		l := bytes.TrimRight(data[i:end], "\r")
		if isSeparator(l) {
			docs = append(docs, document{startLine, data[start:i]})
			start, startLine = end+1, line+1
			if start > len(data) {
				start = len(data)
			}
		}
		if j < 0 {
			break
		}
		i = end + 1
		line++
	}
	docs = append(docs, document{startLine, data[start:]})
	return docs
}

func isSeparator(l []byte) bool {
	if !bytes.HasPrefix(l, []byte("---")) {
		return false
	}
	rest := l[3:]
	return len(rest) == 0 || rest[0] == ' ' || rest[0] == '\t'
}

func trimYAMLError(err error) string {
	s := err.Error()
	s = strings.TrimPrefix(s, "error converting YAML to JSON: ")
	return strings.TrimPrefix(s, "yaml: ")
}

// decodeJSON decodes with numbers kept as json.Number.
func decodeJSON(js []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	return dec.Decode(v)
}

func (m *Manifest) decodeDocument(src string, js []byte) {
	var top map[string]any
	if err := decodeJSON(js, &top); err != nil {
		m.Errors = append(m.Errors, &ObjectError{Source: src, Err: &kindError{ErrSyntax, "document is not a mapping"}})
		return
	}
	apiVersion, _ := top["apiVersion"].(string)
	kind, _ := top["kind"].(string)
	group, version, _ := strings.Cut(apiVersion, "/")
	if version == "" { // core group: "v1"
		group, version = "", group
	}
	switch {
	case kind == "List" && group == "":
		items, _ := top["items"].([]any)
		for _, it := range items {
			b, err := json.Marshal(it)
			if err == nil {
				m.decodeDocument(src, b)
			}
		}
	case group == securityGroup:
		o, err := decodeSecurity(src, apiVersion, version, kind, top)
		if err != nil {
			m.Errors = append(m.Errors, err)
			return
		}
		m.Objects = append(m.Objects, o)
	case kind == "Pod" && group == "":
		w, err := decodePod(src, js)
		if err != nil {
			m.Errors = append(m.Errors, err)
			return
		}
		m.Workloads = append(m.Workloads, w)
	case apiVersion == "" || kind == "":
		m.Errors = append(m.Errors, &ObjectError{Source: src, Err: &kindError{ErrSyntax, "document has no apiVersion or kind"}})
	default:
		md, _ := top["metadata"].(map[string]any)
		name, _ := md["name"].(string)
		ns, _ := md["namespace"].(string)
		m.Skipped = append(m.Skipped, fmt.Sprintf("%s: %s %s %s/%s", src, apiVersion, kind, ns, name))
	}
}

func decodeSecurity(src, apiVersion, version, kind string, top map[string]any) (*Object, error) {
	o := &Object{APIVersion: apiVersion}
	o.Source = src
	var msg proto.Message
	switch kind {
	case "PeerAuthentication":
		o.Kind = KindPeerAuthentication
		o.PeerAuthentication = &securityv1beta1.PeerAuthentication{}
		msg = o.PeerAuthentication
	case "AuthorizationPolicy":
		o.Kind = KindAuthorizationPolicy
		o.AuthorizationPolicy = &securityv1beta1.AuthorizationPolicy{}
		msg = o.AuthorizationPolicy
	case "RequestAuthentication":
		o.Kind = KindRequestAuthentication
		o.RequestAuthentication = &securityv1beta1.RequestAuthentication{}
		msg = o.RequestAuthentication
	}
	md, _ := top["metadata"].(map[string]any)
	o.Name, _ = md["name"].(string)
	o.Namespace, _ = md["namespace"].(string)
	if o.Namespace == "" {
		o.Namespace = "default"
	}
	fail := func(path string, sentinel error, format string, args ...any) error {
		return &ObjectError{Source: src, Kind: o.Kind, Namespace: o.Namespace, Name: o.Name, Path: path,
			Err: &kindError{sentinel, fmt.Sprintf(format, args...)}}
	}
	if msg == nil {
		return nil, fail("kind", ErrUnsupported, "%s %q is not a kind veil reads (PeerAuthentication, AuthorizationPolicy, RequestAuthentication)", securityGroup, kind)
	}
	if version != "v1" && version != "v1beta1" {
		return nil, fail("apiVersion", ErrUnsupported, "%q is not supported; use %s/v1 or %s/v1beta1", apiVersion, securityGroup, securityGroup)
	}
	for _, k := range sortedKeys(top) {
		switch k {
		case "apiVersion", "kind", "metadata", "spec", "status":
		default:
			return nil, fail(k, ErrUnknownField, "unknown field %q", k)
		}
	}
	if err := decodeMeta(&o.Meta, md, top["metadata"]); err != nil {
		var fe *fieldIssue
		if ok := asFieldIssue(err, &fe); ok {
			return nil, fail(fe.path, fe.sentinel, "%s", fe.msg)
		}
		return nil, fail("metadata", ErrSyntax, "%v", err)
	}
	spec := top["spec"]
	if spec == nil {
		spec = map[string]any{}
	}
	if issue := checkFields(msg.ProtoReflect().Descriptor(), spec, "spec"); issue != nil {
		return nil, fail(issue.path, issue.sentinel, "%s", issue.msg)
	}
	js, err := json.Marshal(spec)
	if err != nil {
		return nil, fail("spec", ErrSyntax, "%v", err)
	}
	if err := protojson.Unmarshal(js, msg); err != nil {
		return nil, fail("spec", ErrSyntax, "%s", strings.TrimPrefix(err.Error(), "proto: "))
	}
	return o, nil
}

// fieldIssue is a problem found while walking decoded JSON against a schema.
type fieldIssue struct {
	path     string
	sentinel error
	msg      string
}

func (f *fieldIssue) Error() string { return f.path + ": " + f.msg }

func asFieldIssue(err error, out **fieldIssue) bool {
	fi, ok := err.(*fieldIssue)
	if ok {
		*out = fi
	}
	return ok
}

var knownMetadata = map[string]bool{
	"name": true, "namespace": true, "labels": true, "annotations": true, "creationTimestamp": true,
	"uid": true, "resourceVersion": true, "generation": true, "managedFields": true, "finalizers": true,
	"ownerReferences": true, "generateName": true, "deletionTimestamp": true,
	"deletionGracePeriodSeconds": true, "selfLink": true,
}

// decodeMeta fills meta from metadata. Fields outside ObjectMeta are errors: a misspelt
// "namespace" would otherwise silently move a policy to the default namespace.
func decodeMeta(meta *Meta, md map[string]any, raw any) error {
	if raw != nil && md == nil {
		return &fieldIssue{"metadata", ErrSyntax, "must be a mapping"}
	}
	for _, k := range sortedKeys(md) {
		if !knownMetadata[k] {
			return &fieldIssue{"metadata." + k, ErrUnknownField, fmt.Sprintf("unknown field %q", k)}
		}
	}
	if v, ok := md["name"]; ok {
		if _, isStr := v.(string); !isStr {
			return &fieldIssue{"metadata.name", ErrSyntax, fmt.Sprintf("%v must be a string (quote it)", v)}
		}
	}
	if v, ok := md["namespace"]; ok && v != nil {
		if _, isStr := v.(string); !isStr {
			return &fieldIssue{"metadata.namespace", ErrSyntax, fmt.Sprintf("%v must be a string (quote it; YAML reads y/n/yes/no/on/off as booleans)", v)}
		}
	}
	if meta.Name == "" {
		return &fieldIssue{"metadata.name", ErrInvalid, "required"}
	}
	var err error
	if meta.Labels, err = stringMap(md["labels"], "metadata.labels"); err != nil {
		return err
	}
	if meta.Annotations, err = stringMap(md["annotations"], "metadata.annotations"); err != nil {
		return err
	}
	if ts, ok := md["creationTimestamp"]; ok && ts != nil {
		s, isStr := ts.(string)
		t, perr := time.Parse(time.RFC3339, s)
		if !isStr || perr != nil {
			return &fieldIssue{"metadata.creationTimestamp", ErrSyntax, fmt.Sprintf("%v is not an RFC 3339 time", ts)}
		}
		meta.Created = t
	}
	return nil
}

func stringMap(v any, path string) (map[string]string, error) {
	if v == nil {
		return nil, nil
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, &fieldIssue{path, ErrSyntax, "must be a mapping of strings"}
	}
	out := make(map[string]string, len(m))
	for k, val := range m {
		s, ok := val.(string)
		if !ok {
			return nil, &fieldIssue{path + "." + k, ErrSyntax, fmt.Sprintf("value %v must be a string (quote it)", val)}
		}
		out[k] = s
	}
	return out, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// nonEmptyIfPresent lists the fields that Istio rejects when present but empty.
var nonEmptyIfPresent = map[protoreflect.FullName]bool{
	"istio.security.v1beta1.Rule.from":                          true,
	"istio.security.v1beta1.Rule.to":                            true,
	"istio.security.v1beta1.PeerAuthentication.port_level_mtls": true,
}

// checkFields walks decoded JSON against a message descriptor and reports the first unknown
// field or type mismatch with its full path. protojson would reject the same input, but without
// saying where. Only JSON (camelCase) field names are accepted, as the Kubernetes API server does.
func checkFields(md protoreflect.MessageDescriptor, v any, path string) *fieldIssue {
	if v == nil {
		return nil
	}
	switch md.FullName() {
	case "google.protobuf.Duration":
		if _, ok := v.(string); !ok {
			return &fieldIssue{path, ErrSyntax, fmt.Sprintf("%v must be a duration string such as \"5s\"", v)}
		}
		return nil
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return &fieldIssue{path, ErrSyntax, "must be a mapping"}
	}
	for _, k := range sortedKeys(obj) {
		fd := md.Fields().ByJSONName(k)
		p := path + "." + k
		if fd == nil {
			return &fieldIssue{p, ErrUnknownField, fmt.Sprintf("unknown field %q", k)}
		}
		val := obj[k]
		if val == nil {
			continue
		}
		switch {
		case fd.IsMap():
			mm, ok := val.(map[string]any)
			if !ok {
				return &fieldIssue{p, ErrSyntax, "must be a mapping"}
			}
			if len(mm) == 0 && nonEmptyIfPresent[fd.FullName()] {
				return &fieldIssue{p, ErrInvalid, "must not be empty when present"}
			}
			for _, mk := range sortedKeys(mm) {
				ep := p + "[" + mk + "]"
				switch fd.MapKey().Kind() {
				case protoreflect.Uint32Kind:
					if _, err := strconv.ParseUint(mk, 10, 32); err != nil {
						return &fieldIssue{ep, ErrSyntax, fmt.Sprintf("key %q is not a port number", mk)}
					}
				}
				if issue := checkValue(fd.MapValue(), mm[mk], ep); issue != nil {
					return issue
				}
			}
		case fd.IsList():
			list, ok := val.([]any)
			if !ok {
				return &fieldIssue{p, ErrSyntax, "must be a list"}
			}
			if len(list) == 0 && nonEmptyIfPresent[fd.FullName()] {
				return &fieldIssue{p, ErrInvalid, "must not be empty when present"}
			}
			for i, e := range list {
				ep := p + "[" + strconv.Itoa(i) + "]"
				if e == nil {
					return &fieldIssue{ep, ErrInvalid, "must not be null"}
				}
				if issue := checkValue(fd, e, ep); issue != nil {
					return issue
				}
			}
		default:
			if issue := checkValue(fd, val, p); issue != nil {
				return issue
			}
		}
	}
	return nil
}

// checkValue checks one (non-list) value of field fd.
func checkValue(fd protoreflect.FieldDescriptor, v any, path string) *fieldIssue {
	if v == nil {
		return nil
	}
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return checkFields(fd.Message(), v, path)
	case protoreflect.StringKind:
		if _, ok := v.(string); !ok {
			return &fieldIssue{path, ErrSyntax, fmt.Sprintf("%v must be a string (quote it)", v)}
		}
	case protoreflect.BoolKind:
		if _, ok := v.(bool); !ok {
			return &fieldIssue{path, ErrSyntax, fmt.Sprintf("%v must be true or false", v)}
		}
	case protoreflect.EnumKind:
		s, ok := v.(string)
		if !ok {
			return &fieldIssue{path, ErrSyntax, fmt.Sprintf("%v must be one of %s", v, enumNames(fd.Enum()))}
		}
		if fd.Enum().Values().ByName(protoreflect.Name(s)) == nil {
			return &fieldIssue{path, ErrInvalid, fmt.Sprintf("%q must be one of %s", s, enumNames(fd.Enum()))}
		}
	case protoreflect.Uint32Kind, protoreflect.Int32Kind, protoreflect.Uint64Kind, protoreflect.Int64Kind:
		switch n := v.(type) {
		case json.Number:
		case string:
			if _, err := strconv.ParseInt(n, 10, 64); err != nil {
				return &fieldIssue{path, ErrSyntax, fmt.Sprintf("%q is not a number", n)}
			}
		default:
			return &fieldIssue{path, ErrSyntax, fmt.Sprintf("%v is not a number", v)}
		}
	}
	return nil
}

func enumNames(ed protoreflect.EnumDescriptor) string {
	vals := ed.Values()
	names := make([]string, vals.Len())
	for i := range names {
		names[i] = string(vals.Get(i).Name())
	}
	return strings.Join(names, ", ")
}

// pod is the part of a core/v1 Pod that policy needs.
type pod struct {
	Metadata struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		ServiceAccountName string `json:"serviceAccountName"`
		ServiceAccount     string `json:"serviceAccount"`
	} `json:"spec"`
	Status struct {
		PodIP  string `json:"podIP"`
		PodIPs []struct {
			IP string `json:"ip"`
		} `json:"podIPs"`
	} `json:"status"`
}

func decodePod(src string, js []byte) (*Workload, error) {
	var p pod
	if err := json.Unmarshal(js, &p); err != nil {
		return nil, &ObjectError{Source: src, Err: &kindError{ErrSyntax, "pod: " + err.Error()}}
	}
	w := &Workload{
		Namespace:      p.Metadata.Namespace,
		Name:           p.Metadata.Name,
		Labels:         p.Metadata.Labels,
		ServiceAccount: p.Spec.ServiceAccountName,
		Source:         src,
	}
	if w.Namespace == "" {
		w.Namespace = "default"
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = p.Spec.ServiceAccount
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = "default"
	}
	ips := []string{p.Status.PodIP}
	for _, ip := range p.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	for _, s := range ips {
		if a, err := parseAddr(s); err == nil && !containsAddr(w.IPs, a) {
			w.IPs = append(w.IPs, a)
		}
	}
	return w, nil
}
