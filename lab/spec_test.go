package lab

import (
	"strings"
	"testing"
)

func TestLabNames(t *testing.T) {
	for _, bad := range []string{"", "../..", "demo-2", "Demo", "a/b", "thirteenchars"} {
		if err := CheckName(bad); err == nil {
			t.Errorf("CheckName(%q) accepted", bad)
		}
		if err := Down(bad, Options{StateRoot: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "lab name") {
			t.Errorf("Down(%q) = %v, want a refusal of the name", bad, err)
		}
	}
	if err := CheckName("demo"); err != nil {
		t.Fatal(err)
	}
}

func TestDefaultSpecAddresses(t *testing.T) {
	s := DefaultSpec()
	p, err := s.Pod("bookinfo/reviews")
	if err != nil {
		t.Fatal(err)
	}
	if got := s.PodIP(p).String(); got != "10.100.2.10" {
		t.Fatalf("reviews at %s, want 10.100.2.10", got)
	}
	if _, err := s.Pod("nosuch"); err == nil {
		t.Fatal("found a pod that does not exist")
	}
	if _, err := ParseSpec([]byte("name: x\nnodes: [n]\nunknown: 1\n")); err == nil {
		t.Fatal("unknown field accepted")
	}
	if _, err := ParseSpec([]byte("name: x\nnodes: [n]\npods: [{name: p, namespace: missing, node: n}]\n")); err == nil || !strings.Contains(err.Error(), "pods[0].namespace") {
		t.Fatalf("pod in an undeclared namespace: %v", err)
	}
}
