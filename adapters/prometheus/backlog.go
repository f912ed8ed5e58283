package prometheus

import (
	"context"
	"log/slog"
	"sort"
	"sync"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"
)

// Defaults of BacklogOptions.
const (
	BacklogTimeoutDefault   = 5 * time.Second
	BacklogCacheDefault     = time.Second
	BacklogMaxTopicsDefault = 100
	// OtherTopic is the topic label of the topics past BacklogOptions.MaxTopics.
	OtherTopic = "_other"
)

// TopicBacklog is what waits for one topic.
type TopicBacklog struct {
	Topic     string
	Pending   float64       // rows not yet published, Held included
	Held      float64       // pending rows held behind a parked row of their key, on purpose
	OldestAge time.Duration // age of the oldest pending row not held; zero when none
	Parked    float64       // parked rows
}

// Backlog is what waits in the outbox.
type Backlog struct {
	Topics []TopicBacklog
	// Estimated is true when the counts are extrapolated rather than counted.
	Estimated bool
}

// BacklogFunc reads the backlog; it is called during a scrape.
type BacklogFunc func(ctx context.Context) (Backlog, error)

// BacklogOptions configures WatchBacklog.
type BacklogOptions struct {
	// Timeout bounds one read. Default 5s.
	Timeout time.Duration
	// Cache is how long a read is reused by the next scrapes. Default 1s.
	Cache time.Duration
	// MaxTopics bounds the topic label's values, OtherTopic included: the first MaxTopics-1
	// topics seen keep their label, later ones are summed under OtherTopic. Default 100.
	MaxTopics int
	// Log receives read failures at debug level (the backlog_query_success gauge shows them).
	Log *slog.Logger
}

// backlogCollector reads the backlog when scraped: no background query runs between scrapes.
type backlogCollector struct {
	read BacklogFunc
	opts BacklogOptions

	pending, held, oldest, parked, estimated, success, took *prom.Desc

	mu     sync.Mutex
	at     time.Time
	last   Backlog
	ok     bool
	dur    time.Duration
	topics map[string]bool // topics reported once, reported as 0 afterwards
}

// WatchBacklog registers gauges of the rows pending, held and parked per topic, read by read on
// each scrape (at most once per Cache).
func (m *Metrics) WatchBacklog(read BacklogFunc, opts BacklogOptions) {
	if opts.Timeout <= 0 {
		opts.Timeout = BacklogTimeoutDefault
	}
	if opts.Cache <= 0 {
		opts.Cache = BacklogCacheDefault
	}
	if opts.MaxTopics <= 0 {
		opts.MaxTopics = BacklogMaxTopicsDefault
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	topic := []string{"topic"}
	m.reg.MustRegister(&backlogCollector{
		read: read,
		opts: opts,
		pending: prom.NewDesc("outbox_relay_pending_rows",
			"Outbox rows not yet published, per topic (extrapolated when outbox_relay_pending_estimated is 1).", topic, nil),
		held: prom.NewDesc("outbox_relay_held_rows",
			"Pending rows held on purpose behind a parked row of their key (relay.order_policy wait), per topic: no lag, no stall; retry or drop the parked row to release them.", topic, nil),
		oldest: prom.NewDesc("outbox_relay_oldest_pending_age_seconds",
			"Age of the oldest outbox row not yet published and not held behind a parked row, per topic; 0 when none is pending.", topic, nil),
		parked: prom.NewDesc("outbox_relay_parked_rows",
			"Rows in the parked table, per topic: they need an operator.", topic, nil),
		estimated: prom.NewDesc("outbox_relay_pending_estimated",
			"1 when the pending and parked counts are extrapolated from the oldest rows read, 0 when exact.", nil, nil),
		success: prom.NewDesc("outbox_relay_backlog_query_success",
			"1 when the last backlog query (for the pending and parked gauges) succeeded, else 0.", nil, nil),
		took: prom.NewDesc("outbox_relay_backlog_query_duration_seconds",
			"Duration of the last backlog query.", nil, nil),
		topics: map[string]bool{},
	})
}

// Describe implements prom.Collector.
func (c *backlogCollector) Describe(ch chan<- *prom.Desc) {
	for _, d := range []*prom.Desc{c.pending, c.held, c.oldest, c.parked, c.estimated, c.success, c.took} {
		ch <- d
	}
}

// Collect implements prom.Collector.
func (c *backlogCollector) Collect(ch chan<- prom.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.at) >= c.opts.Cache {
		ctx, cancel := context.WithTimeout(context.Background(), c.opts.Timeout)
		start := time.Now()
		b, err := c.read(ctx)
		cancel()
		c.at, c.dur, c.ok = time.Now(), time.Since(start), err == nil
		if err != nil {
			c.opts.Log.Debug("backlog query failed", "err", err)
		} else {
			c.last = c.fold(b)
		}
	}
	ch <- prom.MustNewConstMetric(c.success, prom.GaugeValue, b2f(c.ok))
	ch <- prom.MustNewConstMetric(c.took, prom.GaugeValue, c.dur.Seconds())
	if !c.ok {
		return // no stale numbers: the gauges are absent until the database answers
	}
	ch <- prom.MustNewConstMetric(c.estimated, prom.GaugeValue, b2f(c.last.Estimated))
	seen := map[string]bool{}
	for _, t := range c.last.Topics {
		seen[t.Topic] = true
		ch <- prom.MustNewConstMetric(c.pending, prom.GaugeValue, t.Pending, t.Topic)
		ch <- prom.MustNewConstMetric(c.held, prom.GaugeValue, t.Held, t.Topic)
		ch <- prom.MustNewConstMetric(c.oldest, prom.GaugeValue, t.OldestAge.Seconds(), t.Topic)
		ch <- prom.MustNewConstMetric(c.parked, prom.GaugeValue, t.Parked, t.Topic)
	}
	for t := range c.topics {
		if !seen[t] { // drained: report 0 rather than a vanishing series
			ch <- prom.MustNewConstMetric(c.pending, prom.GaugeValue, 0, t)
			ch <- prom.MustNewConstMetric(c.held, prom.GaugeValue, 0, t)
			ch <- prom.MustNewConstMetric(c.oldest, prom.GaugeValue, 0, t)
			ch <- prom.MustNewConstMetric(c.parked, prom.GaugeValue, 0, t)
		}
	}
}

// fold keeps the topic label's values bounded: the first MaxTopics-1 topics seen (the largest
// first) keep their label for the life of the process; the others are summed under OtherTopic.
func (c *backlogCollector) fold(b Backlog) Backlog {
	topics := append([]TopicBacklog(nil), b.Topics...)
	sortTopics(topics, c.topics)
	other := TopicBacklog{Topic: OtherTopic}
	folded := false
	b.Topics = b.Topics[:0:0]
	for _, t := range topics {
		if !c.topics[t.Topic] && len(c.topics) < c.opts.MaxTopics-1 {
			c.topics[t.Topic] = true
		}
		if c.topics[t.Topic] {
			b.Topics = append(b.Topics, t)
			continue
		}
		folded = true
		other.Pending += t.Pending
		other.Held += t.Held
		other.Parked += t.Parked
		other.OldestAge = max(other.OldestAge, t.OldestAge)
	}
	if folded {
		b.Topics = append(b.Topics, other)
		c.topics[OtherTopic] = true // reported as 0 once nothing overflows
	}
	return b
}

func sortTopics(ts []TopicBacklog, known map[string]bool) {
	sort.SliceStable(ts, func(i, j int) bool {
		if known[ts[i].Topic] != known[ts[j].Topic] {
			return known[ts[i].Topic]
		}
		return ts[i].Pending+ts[i].Parked > ts[j].Pending+ts[j].Parked
	})
}
