package main

import (
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// The deployment files are checked offline: the Kubernetes manifest is decoded strictly (an
// unknown or misspelt field is an error) into the Kubernetes API types, k8s.io/api, which only
// these tests import; the binary does not link them.

const (
	kubernetesFile = "../../configs/kubernetes.yaml"
	composeFile    = "../../configs/docker-compose.yaml"
	readmeFile     = "../../README.md"
)

// k8sManifest is configs/kubernetes.yaml decoded.
type k8sManifest struct {
	text       string
	secrets    map[string]corev1.Secret
	configMaps map[string]corev1.ConfigMap
	deployment *appsv1.Deployment
}

var docSeparatorRE = regexp.MustCompile(`(?m)^---[ \t]*$`)

// decodeKubernetes decodes every document of the manifest strictly into its API type.
func decodeKubernetes(t *testing.T) *k8sManifest {
	t.Helper()
	b, err := os.ReadFile(kubernetesFile)
	if err != nil {
		t.Fatal(err)
	}
	m := &k8sManifest{text: string(b), secrets: map[string]corev1.Secret{}, configMaps: map[string]corev1.ConfigMap{}}
	for i, doc := range docSeparatorRE.Split(string(b), -1) {
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("%s document %d: %v", kubernetesFile, i, err)
		}
		if meta.Kind == "" && meta.APIVersion == "" {
			continue // comments only
		}
		strict := func(into any) {
			if err := yaml.UnmarshalStrict([]byte(doc), into); err != nil {
				t.Fatalf("%s document %d (%s): %v", kubernetesFile, i, meta.Kind, err)
			}
		}
		switch kind := meta.APIVersion + " " + meta.Kind; kind {
		case "v1 Secret":
			var s corev1.Secret
			strict(&s)
			m.secrets[s.Name] = s
		case "v1 ConfigMap":
			var c corev1.ConfigMap
			strict(&c)
			m.configMaps[c.Name] = c
		case "apps/v1 Deployment":
			if m.deployment != nil {
				t.Fatalf("%s: two Deployments", kubernetesFile)
			}
			m.deployment = &appsv1.Deployment{}
			strict(m.deployment)
		default:
			t.Fatalf("%s document %d: %s, which this test does not check", kubernetesFile, i, kind)
		}
	}
	if m.deployment == nil {
		t.Fatalf("%s has no Deployment", kubernetesFile)
	}
	return m
}

// relayContainer returns the container running `outbox-relay run`.
func (m *k8sManifest) relayContainer(t *testing.T) corev1.Container {
	t.Helper()
	for _, c := range m.deployment.Spec.Template.Spec.Containers {
		if len(c.Args) > 0 && c.Args[0] == "run" {
			return c
		}
	}
	t.Fatalf("%s: no container runs 'run'", kubernetesFile)
	return corev1.Container{}
}

// TestKubernetesManifestReferences decodes configs/kubernetes.yaml strictly and checks what the
// API server would only find out when pods fail to start: every Secret and ConfigMap a volume or
// an environment variable uses is defined in the file (with the key used), or is optional and the
// file says how to create it; every mount names a volume; each container's --config file is in a
// mounted ConfigMap; GOMEMLIMIT is about 80 % of the container's memory limit; the probes and the
// scrape annotations use the port of the ConfigMap's http.addr; the memory figures quoted match
// the README's.
func TestKubernetesManifestReferences(t *testing.T) {
	t.Parallel()
	m := decodeKubernetes(t)
	pod := m.deployment.Spec.Template.Spec

	checkRef := func(where, kind, name string, keys []string, optional *bool) {
		t.Helper()
		var have map[string]bool
		switch kind {
		case "Secret":
			if s, ok := m.secrets[name]; ok {
				have = map[string]bool{}
				for k := range s.Data {
					have[k] = true
				}
				for k := range s.StringData {
					have[k] = true
				}
			}
		case "ConfigMap":
			if c, ok := m.configMaps[name]; ok {
				have = map[string]bool{}
				for k := range c.Data {
					have[k] = true
				}
			}
		}
		if have == nil {
			create := "kubectl create " + map[string]string{"Secret": "secret generic", "ConfigMap": "configmap"}[kind] + " " + name
			if optional == nil || !*optional || !strings.Contains(m.text, create) {
				t.Errorf("%s uses %s %q, which the manifest does not define: pods would wait for it forever "+
					"(define it, or mark it optional: true and say how to create it with %q)", where, kind, name, create)
			}
			return
		}
		for _, k := range keys {
			if !have[k] {
				t.Errorf("%s uses key %q of %s %q, which has no such key", where, k, kind, name)
			}
		}
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
		where := "volume " + v.Name
		switch {
		case v.Secret != nil:
			var keys []string
			for _, it := range v.Secret.Items {
				keys = append(keys, it.Key)
			}
			checkRef(where, "Secret", v.Secret.SecretName, keys, v.Secret.Optional)
		case v.ConfigMap != nil:
			var keys []string
			for _, it := range v.ConfigMap.Items {
				keys = append(keys, it.Key)
			}
			checkRef(where, "ConfigMap", v.ConfigMap.Name, keys, v.ConfigMap.Optional)
		case v.EmptyDir != nil:
		default:
			t.Errorf("%s: a kind of volume this test does not check", where)
		}
	}

	containers := map[string]corev1.Container{}
	all := append(append([]corev1.Container{}, pod.InitContainers...), pod.Containers...)
	for _, c := range all {
		containers[c.Name] = c
	}
	for _, c := range all {
		for _, vm := range c.VolumeMounts {
			if _, ok := volumes[vm.Name]; !ok {
				t.Errorf("container %s mounts volume %q, which the pod does not have", c.Name, vm.Name)
			}
		}
		for _, e := range c.EnvFrom {
			if e.SecretRef != nil {
				checkRef("container "+c.Name+" envFrom", "Secret", e.SecretRef.Name, nil, e.SecretRef.Optional)
			}
			if e.ConfigMapRef != nil {
				checkRef("container "+c.Name+" envFrom", "ConfigMap", e.ConfigMapRef.Name, nil, e.ConfigMapRef.Optional)
			}
		}
		for _, e := range c.Env {
			where := "container " + c.Name + " env " + e.Name
			if e.ValueFrom == nil {
				continue
			}
			if r := e.ValueFrom.SecretKeyRef; r != nil {
				checkRef(where, "Secret", r.Name, []string{r.Key}, r.Optional)
			}
			if r := e.ValueFrom.ConfigMapKeyRef; r != nil {
				checkRef(where, "ConfigMap", r.Name, []string{r.Key}, r.Optional)
			}
			if r := e.ValueFrom.ResourceFieldRef; r != nil && r.ContainerName != "" {
				if _, ok := containers[r.ContainerName]; !ok {
					t.Errorf("%s refers to container %q, which the pod does not have", where, r.ContainerName)
				}
			}
		}
		// The --config file must be a key of a ConfigMap mounted at its directory.
		for i, a := range c.Args {
			if a != "--config" || i+1 == len(c.Args) {
				continue
			}
			file := c.Args[i+1]
			found := false
			for _, vm := range c.VolumeMounts {
				v := volumes[vm.Name]
				if path.Clean(vm.MountPath) != path.Dir(file) || v.ConfigMap == nil {
					continue
				}
				if _, ok := m.configMaps[v.ConfigMap.Name].Data[path.Base(file)]; ok {
					found = true
				}
			}
			if !found {
				t.Errorf("container %s: --config %s is not a key of a ConfigMap mounted at %s", c.Name, file, path.Dir(file))
			}
		}
		// GOMEMLIMIT: about 80 % of the memory limit, leaving room for what the Go heap does not count.
		for _, e := range c.Env {
			if e.Name != "GOMEMLIMIT" {
				continue
			}
			limit := c.Resources.Limits.Memory().Value()
			if e.ValueFrom != nil || limit == 0 {
				t.Errorf("container %s: GOMEMLIMIT must be a value near 80 %% of a memory limit (a resourceFieldRef "+
					"makes it 100 %%); limit %d bytes", c.Name, limit)
				continue
			}
			n, err := parseGoMemLimit(e.Value)
			if err != nil {
				t.Errorf("container %s: GOMEMLIMIT %q: %v", c.Name, e.Value, err)
				continue
			}
			if r := float64(n) / float64(limit); r < 0.75 || r > 0.85 {
				t.Errorf("container %s: GOMEMLIMIT %s is %.0f %% of the memory limit %s, want about 80 %%",
					c.Name, e.Value, 100*r, c.Resources.Limits.Memory())
			}
		}
	}

	// The relay: probes and scrape annotations on the port of the ConfigMap's http.addr.
	relay := m.relayContainer(t)
	ports := map[string]int32{}
	for _, p := range relay.Ports {
		ports[p.Name] = p.ContainerPort
	}
	cfgPort := 0
	for _, c := range m.configMaps {
		if y, ok := c.Data["outbox-relay.yaml"]; ok {
			var cfg struct {
				HTTP struct {
					Addr string `json:"addr"`
				} `json:"http"`
			}
			if err := yaml.Unmarshal([]byte(y), &cfg); err != nil {
				t.Fatalf("ConfigMap %s: %v", c.Name, err)
			}
			_, p, err := net.SplitHostPort(cfg.HTTP.Addr)
			if err != nil {
				t.Fatalf("ConfigMap %s: http.addr %q: %v", c.Name, cfg.HTTP.Addr, err)
			}
			cfgPort, _ = strconv.Atoi(p)
		}
	}
	if cfgPort == 0 {
		t.Fatal("no ConfigMap sets http.addr")
	}
	for name, p := range map[string]*corev1.Probe{"liveness": relay.LivenessProbe, "readiness": relay.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("relay container: no HTTP %s probe", name)
			continue
		}
		port := int(p.HTTPGet.Port.IntVal)
		if p.HTTPGet.Port.StrVal != "" {
			port = int(ports[p.HTTPGet.Port.StrVal])
		}
		if port != cfgPort {
			t.Errorf("relay %s probe on port %s (%d), the relay listens on %d (http.addr)", name, p.HTTPGet.Port.String(), port, cfgPort)
		}
	}
	ann := m.deployment.Spec.Template.Annotations
	if ann["prometheus.io/port"] != strconv.Itoa(cfgPort) || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("scrape annotations port %q path %q, want %d and /metrics", ann["prometheus.io/port"], ann["prometheus.io/path"], cfgPort)
	}

	// Memory figures quoted in the manifest are the README's.
	readme, err := os.ReadFile(readmeFile)
	if err != nil {
		t.Fatal(err)
	}
	ranges := regexp.MustCompile(`(\d+(?:\.\d+)?)[–-](\d+(?:\.\d+)?) MiB`).FindAllStringSubmatch(m.text, -1)
	if len(ranges) == 0 {
		t.Errorf("%s quotes no resident memory figures (N–M MiB); the limit should say what it is based on", kubernetesFile)
	}
	for _, r := range ranges {
		if want := r[1] + "–" + r[2] + " MiB"; !strings.Contains(string(readme), want) {
			t.Errorf("%s quotes %s, which README.md does not", kubernetesFile, r[0])
		}
	}
}

// parseGoMemLimit parses GOMEMLIMIT's syntax: a number of bytes with an optional B, KiB, MiB,
// GiB or TiB suffix.
func parseGoMemLimit(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = n, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("not a number of bytes with B, KiB, MiB, GiB or TiB")
	}
	return n * mult, nil
}

// TestKubernetesProbesAnswer starts the relay as `run` wires it and requests the paths of the
// manifest's probes and scrape annotation: each answers 200 (readiness once the relay is up).
func TestKubernetesProbesAnswer(t *testing.T) {
	t.Parallel()
	m := decodeKubernetes(t)
	relay := m.relayContainer(t)
	paths := []string{m.deployment.Spec.Template.Annotations["prometheus.io/path"]}
	for _, p := range []*corev1.Probe{relay.LivenessProbe, relay.ReadinessProbe} {
		if p != nil && p.HTTPGet != nil {
			paths = append(paths, p.HTTPGet.Path)
		}
	}
	if len(paths) != 3 {
		t.Fatalf("want a scrape path and two HTTP probes, got %v", paths)
	}
	_, table := dbtest.Schema(t)
	broker := kafkatest.Start(t)
	r := startOpsRelay(t, table, broker.Addrs, nil)
	for _, p := range paths {
		u, err := url.JoinPath(r.base, p)
		if err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(60 * time.Second)
		for {
			resp, err := http.Get(u)
			code := 0
			if err == nil {
				code = resp.StatusCode
				_ = resp.Body.Close()
			}
			if code == http.StatusOK {
				break
			}
			if code == http.StatusNotFound || time.Now().After(deadline) {
				t.Errorf("GET %s (a path of %s): %d %v, want 200", p, kubernetesFile, code, err)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// composeFileDecoded is the part of configs/docker-compose.yaml the tests read.
type composeFileDecoded map[string]any

func decodeCompose(t *testing.T) composeFileDecoded {
	t.Helper()
	b, err := os.ReadFile(composeFile)
	if err != nil {
		t.Fatal(err)
	}
	var c composeFileDecoded
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("%s: %v", composeFile, err)
	}
	return c
}

// TestDockerComposeFile checks configs/docker-compose.yaml without Docker: only top-level keys
// every documented Compose accepts (docker-compose 1.x refuses `name`), and no host port that
// the local PostgreSQL of `make demo` and `make test` already uses.
func TestDockerComposeFile(t *testing.T) {
	t.Parallel()
	c := decodeCompose(t)
	for k := range c {
		switch {
		case k == "services" || k == "volumes" || k == "networks" || k == "configs" || k == "secrets":
		case strings.HasPrefix(k, "x-"):
		default:
			t.Errorf("%s: top-level key %q, which docker-compose 1.29 refuses", composeFile, k)
		}
	}
	local := map[int]bool{5432: true}
	if u, err := url.Parse(dbtest.URL()); err == nil && u.Port() != "" {
		p, _ := strconv.Atoi(u.Port())
		local[p] = true
	}
	services, _ := c["services"].(map[string]any)
	if len(services) == 0 {
		t.Fatalf("%s: no services", composeFile)
	}
	for name, s := range services {
		ports, _ := s.(map[string]any)["ports"].([]any)
		for _, p := range ports {
			host := 0
			switch p := p.(type) {
			case string: // [ip:]host:container
				parts := strings.Split(p, ":")
				if len(parts) >= 2 {
					host, _ = strconv.Atoi(parts[len(parts)-2])
				}
			case map[string]any:
				if v, ok := p["published"]; ok {
					host, _ = strconv.Atoi(fmt.Sprint(v))
				}
			}
			if local[host] {
				t.Errorf("%s: service %s publishes host port %d, where the local PostgreSQL of make demo and make test listens",
					composeFile, name, host)
			}
		}
	}
}

// TestDockerComposeConfig validates configs/docker-compose.yaml with Compose itself:
// `docker-compose config` (1.x, the Debian package) and `docker compose config` (v2), each one
// that is installed; skipped, saying so, when neither is.
func TestDockerComposeConfig(t *testing.T) {
	t.Parallel()
	ran := 0
	if p, err := exec.LookPath("docker-compose"); err == nil {
		ran++
		if out, err := exec.Command(p, "-p", "outbox-relay", "-f", composeFile, "config", "-q").CombinedOutput(); err != nil {
			t.Errorf("docker-compose config %s: %v\n%s", composeFile, err, out)
		}
	}
	if p, err := exec.LookPath("docker"); err == nil && exec.Command(p, "compose", "version").Run() == nil {
		ran++
		if out, err := exec.Command(p, "compose", "-p", "outbox-relay", "-f", composeFile, "config", "-q").CombinedOutput(); err != nil {
			t.Errorf("docker compose config %s: %v\n%s", composeFile, err, out)
		}
	}
	if ran == 0 {
		testenv.Missing(t, "neither docker-compose nor docker compose is installed (Debian package docker-compose; .ci/run installs it)")
	}
}
