package controller

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Extra keys of a TokenReview's user for a token bound to a pod.
const (
	podNameExtra = "authentication.kubernetes.io/pod-name"
	podUIDExtra  = "authentication.kubernetes.io/pod-uid"
)

// TokenReview authenticates callers as istiod does: by the projected service-account
// token they send ("authorization: Bearer ..."), checked with a Kubernetes TokenReview
// for Audience. Only tokens bound to a pod are accepted. A caller whose service account
// is AgentServiceAccount is the node agent of the node its pod runs on, and may obtain
// the identities of that node's pods; any other caller is a workload and may obtain only
// its own identity. Answers are cached for CacheTTL (keyed by the token's hash), as the
// API server's own token cache does. Safe for concurrent use.
type TokenReview struct {
	Client kubernetes.Interface
	// Audience the token must carry. Default "istio-ca", what Istio's agents ask for.
	Audience string
	// AgentServiceAccount is "namespace/name" of the node agents. Required.
	AgentServiceAccount string
	TrustDomain         spiffeid.TrustDomain
	// CacheTTL keeps answers; default 10s, never past the token's expiry.
	CacheTTL time.Duration

	mu    sync.Mutex
	cache map[[sha256.Size]byte]cached
}

type cached struct {
	caller identity.Caller
	until  time.Time
}

// Authenticate implements identity.Authenticator.
func (r *TokenReview) Authenticate(ctx context.Context) (identity.Caller, error) {
	tok, err := identity.BearerFrom(ctx)
	if err != nil {
		return identity.Caller{}, err
	}
	key := sha256.Sum256([]byte(tok))
	now := time.Now()
	r.mu.Lock()
	if c, ok := r.cache[key]; ok && now.Before(c.until) {
		r.mu.Unlock()
		return c.caller, nil
	}
	r.mu.Unlock()
	caller, err := r.review(ctx, tok)
	if err != nil {
		return identity.Caller{}, err
	}
	ttl := r.CacheTTL
	if ttl <= 0 {
		ttl = 10 * time.Second
	}
	r.mu.Lock()
	if r.cache == nil || len(r.cache) > 10000 {
		r.cache = map[[sha256.Size]byte]cached{}
	}
	r.cache[key] = cached{caller: caller, until: now.Add(ttl)}
	r.mu.Unlock()
	return caller, nil
}

func (r *TokenReview) review(ctx context.Context, tok string) (identity.Caller, error) {
	aud := r.Audience
	if aud == "" {
		aud = "istio-ca"
	}
	res, err := r.Client.AuthenticationV1().TokenReviews().Create(ctx, &authv1.TokenReview{
		Spec: authv1.TokenReviewSpec{Token: tok, Audiences: []string{aud}},
	}, metav1.CreateOptions{})
	if err != nil {
		return identity.Caller{}, fmt.Errorf("token review: %w", err)
	}
	st := res.Status
	if !st.Authenticated {
		why := st.Error
		if why == "" {
			why = "not authenticated"
		}
		return identity.Caller{}, fmt.Errorf("token review: %s", why)
	}
	if !slices.Contains(st.Audiences, aud) {
		return identity.Caller{}, fmt.Errorf("token review: the token is not for audience %q (it is for %v)", aud, st.Audiences)
	}
	ns, sa, ok := serviceAccountOf(st.User.Username)
	if !ok {
		return identity.Caller{}, fmt.Errorf("token review: %q is not a service account", st.User.Username)
	}
	podName, podUID := extra(st.User.Extra, podNameExtra), extra(st.User.Extra, podUIDExtra)
	if podName == "" || podUID == "" {
		return identity.Caller{}, fmt.Errorf("token review: the token of %s/%s is not bound to a pod (use a projected service-account token)", ns, sa)
	}
	who := fmt.Sprintf("pod %s/%s (service account %s)", ns, podName, sa)
	pod, err := r.Client.CoreV1().Pods(ns).Get(ctx, podName, metav1.GetOptions{})
	if err != nil {
		return identity.Caller{}, fmt.Errorf("%s: %w", who, err)
	}
	if string(pod.UID) != podUID {
		return identity.Caller{}, fmt.Errorf("%s: the token is bound to pod UID %s, the pod now is %s", who, podUID, pod.UID)
	}
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed || pod.Spec.NodeName == "" {
		return identity.Caller{}, fmt.Errorf("%s: not running on a node", who)
	}
	caller := identity.Caller{Node: pod.Spec.NodeName, Name: who}
	if ns+"/"+sa == r.AgentServiceAccount {
		return caller, nil
	}
	id, err := identity.NewID(r.TrustDomain, ns, sa)
	if err != nil {
		return identity.Caller{}, fmt.Errorf("%s: %w", who, err)
	}
	caller.Workload = id
	return caller, nil
}

func serviceAccountOf(username string) (ns, sa string, ok bool) {
	rest, ok := strings.CutPrefix(username, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	ns, sa, ok = strings.Cut(rest, ":")
	return ns, sa, ok && ns != "" && sa != ""
}

func extra(e map[string]authv1.ExtraValue, k string) string {
	if v := e[k]; len(v) == 1 {
		return v[0]
	}
	return ""
}

// FirstOf authenticates with the first authenticator that accepts the caller: bootstrap
// tokens for the lab and non-Kubernetes nodes beside Kubernetes token review.
type FirstOf []identity.Authenticator

// Authenticate implements identity.Authenticator.
func (f FirstOf) Authenticate(ctx context.Context) (identity.Caller, error) {
	var errs []error
	for _, a := range f {
		c, err := a.Authenticate(ctx)
		if err == nil {
			return c, nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return identity.Caller{}, errors.New("no authenticator configured")
	}
	return identity.Caller{}, errors.Join(errs...)
}
