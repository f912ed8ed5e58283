package kafka_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/binding"
	"github.com/cloudevents/sdk-go/v2/binding/spec"
	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// ceSpecs names the CloudEvents attributes as the Kafka protocol binding's headers: ce_<name>,
// and content-type for datacontenttype.
var ceSpecs = spec.WithPrefixMatchExact(func(name string) string {
	if name == "datacontenttype" {
		return "content-type"
	}
	return "ce_" + name
}, "ce_")

// ceMessage reads a Kafka record as a binary-mode CloudEvents message for the SDK's binding
// package, as the Kafka protocol binding says: the attributes are the ce_ headers, the
// datacontenttype the content-type header, the data the value. Headers without the prefix are
// not the event's.
type ceMessage struct{ rec *kgo.Record }

var (
	_ binding.Message               = ceMessage{}
	_ binding.MessageMetadataReader = ceMessage{}
)

func (m ceMessage) version() spec.Version {
	return ceSpecs.Version(kafkatest.Header(m.rec, ceSpecs.PrefixedSpecVersionName()))
}

func (m ceMessage) ReadEncoding() binding.Encoding {
	if m.version() == nil {
		return binding.EncodingUnknown
	}
	return binding.EncodingBinary
}

func (m ceMessage) ReadStructured(context.Context, binding.StructuredWriter) error {
	return binding.ErrNotStructured
}

func (m ceMessage) ReadBinary(_ context.Context, w binding.BinaryWriter) error {
	v := m.version()
	if v == nil {
		return binding.ErrNotBinary
	}
	for _, h := range m.rec.Headers {
		var err error
		if attr := v.Attribute(h.Key); attr != nil {
			err = w.SetAttribute(attr, string(h.Value))
		} else if name, ok := strings.CutPrefix(h.Key, "ce_"); ok {
			err = w.SetExtension(name, string(h.Value))
		}
		if err != nil {
			return err
		}
	}
	if m.rec.Value != nil {
		return w.SetData(bytes.NewReader(m.rec.Value))
	}
	return nil
}

func (m ceMessage) Finish(error) error { return nil }

// GetAttribute implements binding.MessageMetadataReader, which the SDK's ToEvent requires.
func (m ceMessage) GetAttribute(k spec.Kind) (spec.Attribute, any) {
	v := m.version()
	if v == nil {
		return nil, nil
	}
	attr := v.AttributeFromKind(k)
	if attr == nil {
		return nil, nil
	}
	for _, h := range m.rec.Headers {
		if h.Key == attr.PrefixedName() {
			return attr, string(h.Value)
		}
	}
	return attr, nil
}

// GetExtension implements binding.MessageMetadataReader.
func (m ceMessage) GetExtension(name string) any {
	if s := kafkatest.Header(m.rec, "ce_"+name); s != "" {
		return s
	}
	return nil
}

// TestCloudEventsFormat: with kafka.format=cloudevents, the CloudEvents SDK decodes each record
// as an event whose id is the event id, type the event type, source the template expanded,
// subject the aggregate id, time occurred_at and datacontenttype the row's content-type, with
// the payload as data; the native headers are still there (event-id for the relay's consumers).
func TestCloudEventsFormat(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "ce", 1)
	pub, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, Format: kafka.FormatCloudEvents,
		CloudEventsSource: "//shop.example/outbox/{aggregate_type}/{event_type}"})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	occurred := time.Date(2024, 2, 29, 23, 59, 58, 123456000, time.UTC)
	m := &relay.Message{EventID: domain.NewID(), AggregateType: "order line", AggregateID: "o-42",
		EventType: "OrderPlaced", Payload: []byte(`{"total":12}`), Topic: topic, OccurredAt: occurred,
		Headers: []byte(`{"content-type":"application/json","trace-id":"t-1"}`)}
	publishAcked(t, pub, m)
	recs := b.ReadAll(t, topic, 1, 10*time.Second)
	if len(recs) != 1 {
		t.Fatalf("%d records, want 1", len(recs))
	}
	ev, err := binding.ToEvent(context.Background(), ceMessage{recs[0]})
	if err != nil {
		t.Fatalf("the CloudEvents SDK does not read the record as an event: %v", err)
	}
	if err := ev.Validate(); err != nil {
		t.Fatalf("invalid event: %v", err)
	}
	for _, c := range []struct{ attr, got, want string }{
		{"specversion", ev.SpecVersion(), event.CloudEventsVersionV1},
		{"id", ev.ID(), m.EventID},
		{"type", ev.Type(), "OrderPlaced"},
		{"source", ev.Source(), "//shop.example/outbox/order%20line/OrderPlaced"},
		{"subject", ev.Subject(), "o-42"},
		{"datacontenttype", ev.DataContentType(), "application/json"},
		{"data", string(ev.Data()), `{"total":12}`},
	} {
		if c.got != c.want {
			t.Errorf("%s %q, want %q", c.attr, c.got, c.want)
		}
	}
	if !ev.Time().Equal(occurred) {
		t.Errorf("time %s, want occurred_at %s", ev.Time(), occurred)
	}
	if len(ev.Extensions()) != 0 {
		t.Errorf("extensions %v, want none", ev.Extensions())
	}
	if got := kafkatest.Header(recs[0], relay.HeaderEventID); got != m.EventID {
		t.Errorf("event-id header %q, want %q: the relay's consumers read it", got, m.EventID)
	}
	if got := kafkatest.Header(recs[0], "trace-id"); got != "t-1" {
		t.Errorf("row header trace-id %q, want t-1", got)
	}

	// The ce_ names are the relay's in this format: a row that sets one is refused, in any case.
	for _, name := range []string{"ce_id", "CE_Source", "ce_myextension"} {
		bad := *m
		bad.Headers = []byte(`{"` + name + `":"x"}`)
		if _, err := pub.Record(&bad); !errors.Is(err, relay.ErrInvalidMessage) {
			t.Errorf("row header %s: %v, want relay.ErrInvalidMessage", name, err)
		}
	}
	// The native format leaves them to the writer.
	native, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs})
	if err != nil {
		t.Fatal(err)
	}
	defer native.Close()
	bad := *m
	bad.Headers = []byte(`{"ce_id":"x"}`)
	rec, err := native.Record(&bad)
	if err != nil {
		t.Fatalf("native format, row header ce_id: %v", err)
	}
	if got := kafkatest.Header(rec, "ce_specversion"); got != "" {
		t.Errorf("native format sets ce_specversion %q", got)
	}
}

// BenchmarkRecord measures building one record in each format and timestamp mode: the CPU
// kafka.format=cloudevents and kafka.record_timestamp=occurred_at add per event.
func BenchmarkRecord(b *testing.B) {
	for _, c := range []struct {
		name string
		cfg  kafka.Config
	}{
		{"native", kafka.Config{}},
		{"occurred_at", kafka.Config{RecordTimestamp: kafka.TimestampOccurredAt}},
		{"cloudevents", kafka.Config{Format: kafka.FormatCloudEvents}},
	} {
		b.Run(c.name, func(b *testing.B) {
			c.cfg.Brokers = []string{"127.0.0.1:1"}
			pub, err := kafka.NewPublisher(c.cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer pub.Close()
			m := &relay.Message{EventID: domain.NewID(), AggregateType: "order", AggregateID: "order-42",
				EventType: "OrderPlaced", Payload: make([]byte, 256), OccurredAt: time.Now(),
				Headers: []byte(`{"content-type": "application/json", "trace-id": "4bf92f3577b34da6"}`)}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := pub.Record(m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
