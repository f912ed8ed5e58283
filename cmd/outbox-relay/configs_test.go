package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/spf13/viper"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

const (
	configFile    = "../../configs/outbox-relay.yaml"
	dashboardFile = "../../configs/grafana-dashboard.json"
	alertsFile    = "../../configs/prometheus-alerts.yaml"
)

// TestConfigFileDocumentsEveryKey checks that configs/outbox-relay.yaml sets every key of
// settings to its default, and that the relay loads it.
func TestConfigFileDocumentsEveryKey(t *testing.T) {
	t.Parallel()
	v := viper.New()
	v.SetConfigFile(configFile)
	if err := v.ReadInConfig(); err != nil {
		t.Fatalf("read %s: %v", configFile, err)
	}
	present := map[string]bool{}
	for _, k := range v.AllKeys() {
		present[k] = true
	}
	for _, s := range settings {
		if !present[s.key] {
			t.Errorf("%s: key %s missing (default %q)", configFile, s.key, s.def)
			continue
		}
		if got := v.GetString(s.key); got != s.def {
			t.Errorf("%s: %s is %q, want its default %q", configFile, s.key, got, s.def)
		}
	}
	fs := newFlagSet("run", "", os.Stderr)
	addFlags(fs)
	if err := fs.Parse([]string{"--config", configFile}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := loadConfig(fs); err != nil {
		t.Fatalf("load %s: %v", configFile, err)
	}
}

// TestDashboardParses checks that the Grafana dashboard is JSON with a query in every panel.
func TestDashboardParses(t *testing.T) {
	t.Parallel()
	exprs := dashboardExprs(t)
	if len(exprs) < 10 {
		t.Fatalf("%s: %d queries, want a dashboard", dashboardFile, len(exprs))
	}
}

// TestPromtoolCheckRules runs promtool on the alert rules (CI installs it).
func TestPromtoolCheckRules(t *testing.T) {
	t.Parallel()
	promtool := testenv.LookPath(t, "promtool", "Debian package prometheus; .ci/run installs it")
	out, err := exec.Command(promtool, "check", "rules", alertsFile).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check rules %s: %v\n%s", alertsFile, err, out)
	}
	if test := filepath.Join(filepath.Dir(alertsFile), "prometheus-alerts.test.yaml"); fileExists(test) {
		out, err := exec.Command(promtool, "test", "rules", test).CombinedOutput()
		if err != nil {
			t.Fatalf("promtool test rules %s: %v\n%s", test, err, out)
		}
	}
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// dashboardExprs returns every query of the dashboard, failing the test when it does not parse
// or a panel has no query.
func dashboardExprs(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var out []string
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: panel %q has no query", dashboardFile, p.Title)
		}
		for _, tg := range p.Targets {
			if strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("%s: panel %q has an empty query", dashboardFile, p.Title)
			}
			out = append(out, tg.Expr)
		}
	}
	return out
}

// alertExprs returns the expression of every alert rule.
func alertExprs(t *testing.T) []string {
	t.Helper()
	v := viper.New()
	v.SetConfigFile(alertsFile)
	if err := v.ReadInConfig(); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	var out []string
	groups, _ := v.Get("groups").([]any)
	for _, g := range groups {
		rules, _ := g.(map[string]any)["rules"].([]any)
		for _, r := range rules {
			if e, ok := r.(map[string]any)["expr"].(string); ok {
				out = append(out, e)
			}
		}
	}
	if len(out) < 5 {
		t.Fatalf("%s: %d rules, want at least 5", alertsFile, len(out))
	}
	return out
}

var metricNameRE = regexp.MustCompile(`\boutbox_relay_[a-z0-9_]+`)

// checkQueriedMetrics checks that every outbox_relay_ metric the dashboard and the alert rules
// query is one the relay exported in mfs (a scrape after a run).
func checkQueriedMetrics(t *testing.T, mfs map[string]*dto.MetricFamily) {
	t.Helper()
	exported := func(name string) bool {
		if mfs[name] != nil {
			return true
		}
		for _, suffix := range []string{"_bucket", "_count", "_sum"} {
			if base, ok := strings.CutSuffix(name, suffix); ok {
				if mf := mfs[base]; mf != nil && mf.GetType() == dto.MetricType_HISTOGRAM {
					return true
				}
			}
		}
		return false
	}
	for file, exprs := range map[string][]string{dashboardFile: dashboardExprs(t), alertsFile: alertExprs(t)} {
		var missing []string
		seen := map[string]bool{}
		for _, e := range exprs {
			for _, name := range metricNameRE.FindAllString(e, -1) {
				if !seen[name] && !exported(name) {
					missing = append(missing, name)
				}
				seen[name] = true
			}
		}
		sort.Strings(missing)
		if len(missing) > 0 {
			t.Errorf("%s queries metrics the relay does not export: %s", file, strings.Join(missing, ", "))
		}
		if len(seen) == 0 {
			t.Errorf("%s queries no outbox_relay_ metric", file)
		}
	}
}

// TestDeploymentFilesUseKnownSettings checks that the relay's configuration embedded in the
// Kubernetes ConfigMap loads, and that every OUTBOX_ variable the deployment files set is one
// the relay reads.
func TestDeploymentFilesUseKnownSettings(t *testing.T) {
	t.Parallel()
	known := map[string]bool{"OUTBOX_CONFIG": true}
	for _, s := range settings {
		known[envName(s.key)] = true
	}
	envRE := regexp.MustCompile(`\b(OUTBOX_[A-Z0-9_]+)\b`)
	for _, f := range []string{"../../configs/kubernetes.yaml", "../../configs/docker-compose.yaml", "../../Dockerfile"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range envRE.FindAllStringSubmatch(string(b), -1) {
			if !known[m[1]] {
				t.Errorf("%s sets %s, which the relay does not read", f, m[1])
			}
		}
	}

	b, err := os.ReadFile("../../configs/kubernetes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, doc := range strings.Split(string(b), "\n---\n") {
		v := viper.New()
		v.SetConfigType("yaml")
		if err := v.ReadConfig(strings.NewReader(doc)); err != nil {
			t.Fatalf("kubernetes.yaml: %v", err)
		}
		if v.GetString("kind") != "ConfigMap" {
			continue
		}
		data := v.GetStringMapString("data")
		cfg, ok := data["outbox-relay.yaml"]
		if !ok {
			t.Fatalf("ConfigMap has no outbox-relay.yaml: %v", data)
		}
		found = true
		path := filepath.Join(t.TempDir(), "outbox-relay.yaml")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		fs := newFlagSet("run", "", os.Stderr)
		addFlags(fs)
		if err := fs.Parse([]string{"--config", path}); err != nil {
			t.Fatal(err)
		}
		c, _, err := loadConfig(fs)
		if err != nil {
			t.Fatalf("the ConfigMap's configuration does not load: %v", err)
		}
		if len(c.Kafka.Brokers) != 3 {
			t.Errorf("ConfigMap brokers %v, want 3", c.Kafka.Brokers)
		}
	}
	if !found {
		t.Fatal("kubernetes.yaml has no ConfigMap")
	}
}

// checkMetricsDocumented checks that README.md's Operations section names every outbox_relay_
// metric the relay exported in mfs (franz-go's are documented as the outbox_relay_kafka_ group).
func checkMetricsDocumented(t *testing.T, mfs map[string]*dto.MetricFamily) {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, ops, ok := strings.Cut(string(b), "\n## Operations\n")
	if !ok {
		t.Fatal("README.md has no Operations section")
	}
	if i := strings.Index(ops, "\n## "); i >= 0 {
		ops = ops[:i]
	}
	for name := range mfs {
		if !strings.HasPrefix(name, "outbox_relay_") {
			continue
		}
		if rest, ok := strings.CutPrefix(name, "outbox_relay_kafka_"); ok {
			if !strings.Contains(ops, "`outbox_relay_kafka_*`") || !strings.Contains(ops, "`"+rest+"`") {
				t.Errorf("README.md Operations does not document %s", name)
			}
			continue
		}
		if !strings.Contains(ops, "`"+name+"`") && !strings.Contains(ops, "`"+name+"{") {
			t.Errorf("README.md Operations does not document %s", name)
		}
	}
}

// TestDashboardSelectsOutbox checks that the dashboard has an outbox variable and that every
// query of a relay metric (but the build information, which is the process's) filters by it.
func TestDashboardSelectsOutbox(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"name": "outbox"`) {
		t.Errorf("%s: no outbox variable", dashboardFile)
	}
	for _, e := range dashboardExprs(t) {
		if strings.Contains(e, "outbox_relay_") && !strings.Contains(e, "build_info") && !strings.Contains(e, `outbox=~"$outbox"`) {
			t.Errorf("%s: query does not filter by $outbox: %s", dashboardFile, e)
		}
	}
}
