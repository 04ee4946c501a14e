package cluster

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
)

// object is the part of a Namespace, Pod, Service or List that LoadDir reads.
type object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name        string            `json:"name"`
		Namespace   string            `json:"namespace"`
		UID         string            `json:"uid"`
		Labels      map[string]string `json:"labels"`
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
	Spec struct {
		// Pod
		ServiceAccountName string `json:"serviceAccountName"`
		ServiceAccount     string `json:"serviceAccount"`
		NodeName           string `json:"nodeName"`
		HostNetwork        bool   `json:"hostNetwork"`
		Containers         []struct {
			Ports []struct {
				Name          string `json:"name"`
				ContainerPort int    `json:"containerPort"`
			} `json:"ports"`
		} `json:"containers"`
		// Service
		ClusterIP  string            `json:"clusterIP"`
		ClusterIPs []string          `json:"clusterIPs"`
		Selector   map[string]string `json:"selector"`
		Ports      []struct {
			Name        string `json:"name"`
			Protocol    string `json:"protocol"`
			AppProtocol string `json:"appProtocol"`
			Port        int    `json:"port"`
			TargetPort  any    `json:"targetPort"` // int or string
		} `json:"ports"`
	} `json:"spec"`
	Status struct {
		PodIP  string `json:"podIP"`
		PodIPs []struct {
			IP string `json:"ip"`
		} `json:"podIPs"`
		Phase   string `json:"phase"`
		HostIP  string `json:"hostIP"`
		HostIPs []struct {
			IP string `json:"ip"`
		} `json:"hostIPs"`
		Conditions []struct {
			Type   string `json:"type"`
			Status string `json:"status"`
		} `json:"conditions"`
	} `json:"status"`
}

// header is what every document is read as first: only the kinds veil models (core/v1
// objects, EndpointSlices, Gateways) are decoded further, so other kinds (Istio
// policies, Deployments, HTTPRoutes) never fail on fields that mean something else to
// them.
type header struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Items      []json.RawMessage `json:"items"`
}

// LoadDir reads Namespaces, Pods, Services, EndpointSlices and Gateways from every *.yaml, *.yml and *.json file
// directly in dir (kubectl-style manifests, several documents a file, kind List
// unpacked), in name order. Other kinds are skipped. An object that cannot be decoded is
// reported in errs, naming its file and document, and left out; err is only for a
// directory that cannot be read.
func LoadDir(dir string) (st *State, errs []error, err error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: %w", err)
	}
	var names []string
	for _, e := range entries {
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".yaml", ".yml", ".json":
			if !e.IsDir() {
				names = append(names, filepath.Join(dir, e.Name()))
			}
		}
	}
	sort.Strings(names)
	st = &State{Namespaces: map[string]*Namespace{}}
	for _, name := range names {
		data, err := os.ReadFile(name)
		if err != nil {
			return nil, nil, fmt.Errorf("cluster: %w", err)
		}
		errs = append(errs, st.add(name, data)...)
	}
	return st, errs, nil
}

// Parse reads the objects of one manifest into a new State.
func Parse(file string, data []byte) (*State, []error) {
	st := &State{Namespaces: map[string]*Namespace{}}
	errs := st.add(file, data)
	return st, errs
}

func (st *State) add(file string, data []byte) []error {
	var errs []error
	dec := k8syaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	for doc := 1; ; doc++ {
		var raw json.RawMessage
		err := dec.Decode(&raw)
		if errors.Is(err, io.EOF) {
			return errs
		}
		src := fmt.Sprintf("%s#%d", file, doc)
		if err != nil {
			// The decoder cannot resynchronise after a syntax error: the rest of the file is lost.
			return append(errs, fmt.Errorf("%s: %w", src, err))
		}
		if err := st.addDocument(src, raw); err != nil {
			errs = append(errs, err...)
		}
	}
}

func (st *State) addDocument(src string, raw json.RawMessage) []error {
	var h header
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	if err := json.Unmarshal(raw, &h); err != nil {
		return []error{fmt.Errorf("%s: %w", src, err)}
	}
	if h.APIVersion == "discovery.k8s.io/v1" && h.Kind == "EndpointSlice" {
		if err := st.addEndpointSlice(src, raw); err != nil {
			return []error{err}
		}
		return nil
	}
	if h.Kind == "Gateway" && (h.APIVersion == GatewayAPIGroup+"/v1" || h.APIVersion == GatewayAPIGroup+"/v1beta1") {
		if err := st.addGateway(src, raw); err != nil {
			return []error{err}
		}
		return nil
	}
	if h.APIVersion != "v1" {
		return nil
	}
	if h.Kind == "List" {
		var errs []error
		for _, item := range h.Items {
			errs = append(errs, st.addDocument(src, item)...)
		}
		return errs
	}
	if h.Kind != "Namespace" && h.Kind != "Pod" && h.Kind != "Service" {
		return nil
	}
	var o object
	if err := json.Unmarshal(raw, &o); err != nil {
		return []error{fmt.Errorf("%s: %s: %w", src, h.Kind, err)}
	}
	if err := st.addObject(src, &o); err != nil {
		return []error{err}
	}
	return nil
}

func (st *State) addObject(src string, o *object) error {
	if o.APIVersion != "v1" {
		return nil
	}
	name := func() string { return o.Metadata.Namespace + "/" + o.Metadata.Name }
	if o.Metadata.Name == "" && (o.Kind == "Namespace" || o.Kind == "Pod" || o.Kind == "Service") {
		return fmt.Errorf("%s: %s: metadata.name: required", src, o.Kind)
	}
	if o.Metadata.Namespace == "" && o.Kind != "Namespace" {
		o.Metadata.Namespace = "default" // as kubectl applies it without -n
	}
	switch o.Kind {
	case "Namespace":
		st.Namespaces[o.Metadata.Name] = &Namespace{Name: o.Metadata.Name, Labels: o.Metadata.Labels}
	case "Pod":
		// A pod that has finished (phase Succeeded or Failed) is no workload: it keeps its
		// podIP, which IPAM hands to a new pod, and would claim that pod's address and
		// identity.
		if o.Status.Phase == "Succeeded" || o.Status.Phase == "Failed" {
			return nil
		}
		p := &Pod{
			Namespace:      o.Metadata.Namespace,
			Name:           o.Metadata.Name,
			UID:            o.Metadata.UID,
			ServiceAccount: o.Spec.ServiceAccountName,
			Node:           o.Spec.NodeName,
			Labels:         o.Metadata.Labels,
			Annotations:    o.Metadata.Annotations,
			HostNetwork:    o.Spec.HostNetwork,
			Ready:          true,
			Source:         src,
		}
		if p.ServiceAccount == "" {
			p.ServiceAccount = o.Spec.ServiceAccount
		}
		if p.ServiceAccount == "" {
			p.ServiceAccount = "default"
		}
		ips := []string{o.Status.PodIP}
		for _, ip := range o.Status.PodIPs {
			ips = append(ips, ip.IP)
		}
		for i, s := range ips {
			if s == "" {
				continue
			}
			a, err := netip.ParseAddr(s)
			if err != nil {
				field := "status.podIP"
				if i > 0 {
					field = fmt.Sprintf("status.podIPs[%d].ip", i-1)
				}
				return fmt.Errorf("%s: pod %s: %s: %q is not an IP address", src, name(), field, s)
			}
			if a = a.Unmap(); !containsAddr(p.IPs, a) {
				p.IPs = append(p.IPs, a)
			}
		}
		hips := []string{o.Status.HostIP}
		for _, ip := range o.Status.HostIPs {
			hips = append(hips, ip.IP)
		}
		for i, s := range hips {
			if s == "" {
				continue
			}
			a, err := netip.ParseAddr(s)
			if err != nil {
				field := "status.hostIP"
				if i > 0 {
					field = fmt.Sprintf("status.hostIPs[%d].ip", i-1)
				}
				return fmt.Errorf("%s: pod %s: %s: %q is not an IP address", src, name(), field, s)
			}
			if a = a.Unmap(); !containsAddr(p.HostIPs, a) {
				p.HostIPs = append(p.HostIPs, a)
			}
		}
		for _, c := range o.Spec.Containers {
			for _, cp := range c.Ports {
				if cp.ContainerPort > 0 && cp.ContainerPort <= 65535 {
					p.Ports = append(p.Ports, uint16(cp.ContainerPort))
				}
				if cp.Name != "" && cp.ContainerPort > 0 && cp.ContainerPort <= 65535 {
					if p.NamedPorts == nil {
						p.NamedPorts = map[string]uint16{}
					}
					p.NamedPorts[cp.Name] = uint16(cp.ContainerPort)
				}
			}
		}
		for _, c := range o.Status.Conditions {
			if c.Type == "Ready" {
				p.Ready = c.Status == "True"
			}
		}
		st.Pods = append(st.Pods, p)
	case "Service":
		svc := &Service{Namespace: o.Metadata.Namespace, Name: o.Metadata.Name, Labels: o.Metadata.Labels, Selector: o.Spec.Selector, Source: src}
		ips := append([]string{o.Spec.ClusterIP}, o.Spec.ClusterIPs...)
		for i, s := range ips {
			if s == "" || s == "None" {
				continue
			}
			a, err := netip.ParseAddr(s)
			if err != nil {
				field := "spec.clusterIP"
				if i > 0 {
					field = fmt.Sprintf("spec.clusterIPs[%d]", i-1)
				}
				return fmt.Errorf("%s: service %s: %s: %q is not an IP address", src, name(), field, s)
			}
			if a = a.Unmap(); !containsAddr(svc.ClusterIPs, a) {
				svc.ClusterIPs = append(svc.ClusterIPs, a)
			}
		}
		for i, p := range o.Spec.Ports {
			sp := ServicePort{Name: p.Name, Protocol: p.Protocol, AppProtocol: p.AppProtocol}
			if sp.Protocol == "" {
				sp.Protocol = "TCP"
			}
			if p.Port < 1 || p.Port > 65535 {
				return fmt.Errorf("%s: service %s: spec.ports[%d].port: %d is not a port", src, name(), i, p.Port)
			}
			sp.Port = uint16(p.Port)
			switch tp := p.TargetPort.(type) {
			case nil:
				sp.TargetPort = sp.Port
			case float64:
				if tp < 1 || tp > 65535 || tp != float64(int(tp)) {
					return fmt.Errorf("%s: service %s: spec.ports[%d].targetPort: %v is not a port", src, name(), i, tp)
				}
				sp.TargetPort = uint16(tp)
			case string:
				sp.TargetName = tp
			default:
				return fmt.Errorf("%s: service %s: spec.ports[%d].targetPort: want a number or a name", src, name(), i)
			}
			svc.Ports = append(svc.Ports, sp)
		}
		st.Services = append(st.Services, svc)
	}
	return nil
}

func containsAddr(list []netip.Addr, a netip.Addr) bool {
	for _, x := range list {
		if x == a {
			return true
		}
	}
	return false
}

// endpointSlice is the part of a discovery.k8s.io/v1 EndpointSlice that veil reads.
type endpointSlice struct {
	Metadata struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	AddressType string `json:"addressType"`
	Endpoints   []struct {
		Addresses  []string `json:"addresses"`
		Conditions struct {
			Ready *bool `json:"ready"`
		} `json:"conditions"`
	} `json:"endpoints"`
	Ports []struct {
		Name     *string `json:"name"`
		Protocol *string `json:"protocol"`
		Port     *int    `json:"port"`
	} `json:"ports"`
}

// ServiceNameLabel names the Service an EndpointSlice belongs to.
const ServiceNameLabel = "kubernetes.io/service-name"

func (st *State) addEndpointSlice(src string, raw json.RawMessage) error {
	var o endpointSlice
	if err := json.Unmarshal(raw, &o); err != nil {
		return fmt.Errorf("%s: EndpointSlice: %w", src, err)
	}
	ns := o.Metadata.Namespace
	if ns == "" {
		ns = "default"
	}
	what := fmt.Sprintf("%s: endpointslice %s/%s", src, ns, o.Metadata.Name)
	if o.Metadata.Name == "" {
		return fmt.Errorf("%s: EndpointSlice: metadata.name: required", src)
	}
	svc := o.Metadata.Labels[ServiceNameLabel]
	if svc == "" {
		return nil // not a Service's slice: nothing for veil
	}
	if o.AddressType == "FQDN" {
		return nil // names, not addresses: veil balances over addresses only
	}
	sl := &EndpointSlice{Namespace: ns, Name: o.Metadata.Name, Service: svc, Source: src}
	for i, p := range o.Ports {
		ep := EndpointPort{Protocol: "TCP"}
		if p.Name != nil {
			ep.Name = *p.Name
		}
		if p.Protocol != nil {
			ep.Protocol = *p.Protocol
		}
		if p.Port == nil {
			continue // all ports: not usable for a Service port mapping
		}
		if *p.Port < 1 || *p.Port > 65535 {
			return fmt.Errorf("%s: ports[%d].port: %d", what, i, *p.Port)
		}
		ep.Port = uint16(*p.Port)
		sl.Ports = append(sl.Ports, ep)
	}
	for i, e := range o.Endpoints {
		ready := e.Conditions.Ready == nil || *e.Conditions.Ready
		end := Endpoint{Ready: ready}
		for j, a := range e.Addresses {
			ip, err := netip.ParseAddr(a)
			if err != nil {
				return fmt.Errorf("%s: endpoints[%d].addresses[%d]: %q is not an IP address", what, i, j, a)
			}
			end.Addresses = append(end.Addresses, ip.Unmap())
		}
		sl.Endpoints = append(sl.Endpoints, end)
	}
	st.EndpointSlices = append(st.EndpointSlices, sl)
	return nil
}

// GatewayAPIGroup is the API group of the Kubernetes Gateway API.
const GatewayAPIGroup = "gateway.networking.k8s.io"

// gateway is the part of a gateway.networking.k8s.io Gateway that veil reads.
type gateway struct {
	Metadata struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		GatewayClassName string `json:"gatewayClassName"`
		Listeners        []struct {
			Name     string `json:"name"`
			Port     int    `json:"port"`
			Protocol string `json:"protocol"`
		} `json:"listeners"`
	} `json:"spec"`
	Status struct {
		Addresses []struct {
			Type  string `json:"type"`
			Value string `json:"value"`
		} `json:"addresses"`
	} `json:"status"`
}

func (st *State) addGateway(src string, raw json.RawMessage) error {
	var o gateway
	err := json.Unmarshal(raw, &o)
	ns := o.Metadata.Namespace
	if ns == "" {
		ns = "default"
	}
	if o.Metadata.Name == "" {
		if err != nil {
			return fmt.Errorf("%s: Gateway: %w", src, err)
		}
		return fmt.Errorf("%s: Gateway: metadata.name: required", src)
	}
	what := fmt.Sprintf("%s: gateway %s/%s", src, ns, o.Metadata.Name)
	if err != nil {
		// A field of the wrong type: json names it; the rest was decoded as far as it went.
		return fmt.Errorf("%s: %w", what, err)
	}
	if o.Spec.GatewayClassName == "" {
		return fmt.Errorf("%s: spec.gatewayClassName: required", what)
	}
	gw := &Gateway{Namespace: ns, Name: o.Metadata.Name, ClassName: o.Spec.GatewayClassName, Labels: o.Metadata.Labels, Source: src}
	for i, l := range o.Spec.Listeners {
		switch {
		case l.Name == "":
			return fmt.Errorf("%s: spec.listeners[%d].name: required", what, i)
		case l.Port < 1 || l.Port > 65535:
			return fmt.Errorf("%s: spec.listeners[%d].port: %d is not a port", what, i, l.Port)
		case l.Protocol == "":
			return fmt.Errorf("%s: spec.listeners[%d].protocol: required", what, i)
		}
		for _, prev := range gw.Listeners {
			if prev.Name == l.Name {
				return fmt.Errorf("%s: spec.listeners[%d].name: %q is listed twice", what, i, l.Name)
			}
		}
		gw.Listeners = append(gw.Listeners, GatewayListener{Name: l.Name, Port: uint16(l.Port), Protocol: l.Protocol})
	}
	for i, a := range o.Status.Addresses {
		if a.Value == "" {
			return fmt.Errorf("%s: status.addresses[%d].value: required", what, i)
		}
		switch a.Type {
		case "", "IPAddress": // the default
			ip, err := netip.ParseAddr(a.Value)
			if err != nil {
				return fmt.Errorf("%s: status.addresses[%d].value: %q is not an IP address", what, i, a.Value)
			}
			if ip = ip.Unmap(); ip.IsUnspecified() {
				return fmt.Errorf("%s: status.addresses[%d].value: %q is not a usable address", what, i, a.Value)
			}
			if !containsAddr(gw.Addresses, ip) {
				gw.Addresses = append(gw.Addresses, ip)
			}
		case "Hostname":
			if !slices.Contains(gw.Hostnames, a.Value) {
				gw.Hostnames = append(gw.Hostnames, a.Value)
			}
		default:
			// NamedAddress and implementation-specific types: nothing veil can dial.
		}
	}
	st.Gateways = append(st.Gateways, gw)
	return nil
}
