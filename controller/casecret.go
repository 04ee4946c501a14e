package controller

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/veilmesh/veil/identity"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// caFiles are the keys of the CA Secret: Istio's cacerts layout.
var caFiles = identity.CAFileNames

// RootConfigMapKey is the key under which the trust bundle is published.
const RootConfigMapKey = identity.RootCertFile

// LoadOrCreateCASecret returns the CA kept in the Secret namespace/name, in Istio's
// cacerts layout (an operator's plug-in root or intermediate goes there as it would for
// Istio). When the Secret does not exist, a root is generated and the Secret created;
// when another replica created it first, that one is used, so replicas starting together
// end with one root. The Secret is checked as a --ca-dir is (identity.ParseCA: a key that
// does not match, a certificate that is not a CA, a chain that does not verify to a root
// of root-cert.pem are refused, with an error naming the Secret and the key); a Secret
// that exists but lacks some of the files is refused, never filled in.
func LoadOrCreateCASecret(ctx context.Context, cs kubernetes.Interface, namespace, name string, opts identity.CAOptions) (*identity.CA, error) {
	secrets := cs.CoreV1().Secrets(namespace)
	s, err := secrets.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		s, err = createCASecret(ctx, cs, namespace, name, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("controller: CA secret %s/%s: %w", namespace, name, err)
	}
	ca, err := identity.ParseCA(secretCAFiles(s), opts)
	if err != nil {
		return nil, fmt.Errorf("controller: CA secret %s/%s: %w", namespace, name, err)
	}
	return ca, nil
}

// SecretCAFiles returns a CAReloader's read function for the CA Secret namespace/name:
// its data under the keys of Istio's cacerts layout. Replacing the Secret's content
// (kubectl replace) is how an operator rotates the CA.
func SecretCAFiles(cs kubernetes.Interface, namespace, name string) func(context.Context) (map[string][]byte, error) {
	return func(ctx context.Context) (map[string][]byte, error) {
		s, err := cs.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		return secretCAFiles(s), nil
	}
}

func secretCAFiles(s *corev1.Secret) map[string][]byte {
	files := map[string][]byte{}
	for _, f := range caFiles {
		if b, ok := s.Data[f]; ok {
			files[f] = b
		}
	}
	return files
}

// createCASecret generates a root and creates the Secret, or returns the one another
// replica created meanwhile.
func createCASecret(ctx context.Context, cs kubernetes.Interface, namespace, name string, opts identity.CAOptions) (*corev1.Secret, error) {
	dir, err := os.MkdirTemp("", "veil-ca-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if _, err := identity.LoadOrCreateCA(dir, opts); err != nil {
		return nil, err
	}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace,
		Labels: map[string]string{"app.kubernetes.io/managed-by": "veil-controller"}}, Data: map[string][]byte{}}
	for _, f := range caFiles {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return nil, err
		}
		s.Data[f] = b
	}
	created, err := cs.CoreV1().Secrets(namespace).Create(ctx, s, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return cs.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
	}
	return created, err
}

// PublishRoot writes the CA's trust bundle to the ConfigMap namespace/name (key
// root-cert.pem), creating or updating it, for agents to mount as their --ca-root.
func PublishRoot(ctx context.Context, cs kubernetes.Interface, namespace, name string, ca *identity.CA) error {
	root := string(ca.RootsPEM())
	cms := cs.CoreV1().ConfigMaps(namespace)
	cm, err := cms.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace},
			Data: map[string]string{RootConfigMapKey: root}}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return PublishRoot(ctx, cs, namespace, name, ca)
		}
		return err
	}
	if err != nil {
		return fmt.Errorf("controller: root configmap %s/%s: %w", namespace, name, err)
	}
	if cm.Data[RootConfigMapKey] == root {
		return nil
	}
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[RootConfigMapKey] = root
	_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	return err
}
