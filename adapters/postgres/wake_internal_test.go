package postgres

import (
	"testing"
	"time"
)

// TestBusyCountsNotificationsPerWindow: a sleeping session lets its sleep lock go once it heard
// busyWakeUps notifications within busyWindow (or as many per window over a longer time it did not
// look in), and not at half that rate.
func TestBusyCountsNotificationsPerWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var w wakeState
	w.since = t0
	w.heardN.Add(busyWakeUps - 1)
	if w.busy(t0.Add(busyWindow / 2)) {
		t.Fatalf("busy after %d notifications within the window, want %d", busyWakeUps-1, busyWakeUps)
	}
	w.heardN.Add(1)
	if !w.busy(t0.Add(busyWindow / 2)) {
		t.Fatalf("not busy after %d notifications within the window", busyWakeUps)
	}

	// Half the rate, looked at every window: never busy; each window starts where the last ended.
	w = wakeState{since: t0}
	now := t0
	for range 20 {
		now = now.Add(busyWindow + time.Millisecond)
		w.heardN.Add(busyWakeUps / 2)
		if w.busy(now) {
			t.Fatalf("busy at %d notifications per window", busyWakeUps/2)
		}
		if w.since != now || w.base != w.heardN.Load() {
			t.Fatalf("the ended window did not restart at now: since %v base %d", w.since, w.base)
		}
	}

	// Looked at only after three windows: busy at the threshold's rate, not below it.
	w = wakeState{since: t0}
	w.heardN.Add(3 * busyWakeUps)
	if !w.busy(t0.Add(3 * busyWindow)) {
		t.Fatalf("not busy at %d notifications in three windows", 3*busyWakeUps)
	}
	w = wakeState{since: t0}
	w.heardN.Add(3*busyWakeUps - 1)
	if w.busy(t0.Add(3 * busyWindow)) {
		t.Fatalf("busy at %d notifications in three windows", 3*busyWakeUps-1)
	}

	// A burst after a quiet spell: counted from its first notification, not from the window
	// that began before the spell.
	w = wakeState{since: t0}
	burst := t0.Add(time.Second)
	w.firstAt.Store(burst.UnixNano())
	w.heardN.Add(busyWakeUps)
	if !w.busy(burst.Add(busyWindow / 2)) {
		t.Fatalf("not busy at a burst of %d notifications after a quiet second", busyWakeUps)
	}
	if w.firstAt.Load() != 0 || w.base != busyWakeUps {
		t.Fatal("the ended window did not restart")
	}
}

// TestQuietPollingGoesToSleep: a polling session whose claims returned fewer than quietRows rows
// in a window that ended is quiet (it goes to sleep at its next wait), and one at or above that
// rate is not.
func TestQuietPollingGoesToSleep(t *testing.T) {
	s := &session{}
	s.wake.awake = true
	s.wake.since = time.Now()
	s.claimed(int(s.wake.quietRows())) // within the window: nothing decided yet
	if s.wake.quiet {
		t.Fatal("quiet before its window ended")
	}
	s.wake.since = time.Now().Add(-busyWindow - time.Millisecond) // the window ended
	s.claimed(int(s.wake.quietRows()))
	if s.wake.quiet {
		t.Fatalf("quiet after %d rows in a window", 2*s.wake.quietRows())
	}
	s.wake.since = time.Now().Add(-busyWindow - time.Millisecond)
	s.claimed(int(s.wake.quietRows() / 2))
	if !s.wake.quiet {
		t.Fatalf("not quiet after %d rows in a window", s.wake.quietRows()/2)
	}
	if s.wake.rows != 0 {
		t.Fatalf("the next window starts with %d rows", s.wake.rows)
	}
}

// TestProbeAfterASpellAsleepAtARate: a session asleep for probeAfter lets the lock go to probe
// when it was woken at probeRate a second or more, not sooner and not at a lower rate.
func TestProbeAfterASpellAsleepAtARate(t *testing.T) {
	t0 := time.Unix(1000, 0)
	w := wakeState{probeFrom: t0}
	perSpell := int64(probeRate) * int64(probeAfter) / int64(time.Second)
	w.heardN.Add(perSpell)
	if w.probe(t0.Add(probeAfter / 2)) {
		t.Fatal("probed before probeAfter")
	}
	if !w.probe(t0.Add(probeAfter)) {
		t.Fatalf("no probe after probeAfter at %d notifications", perSpell)
	}
	w = wakeState{probeFrom: t0}
	w.heardN.Add(perSpell - 1)
	if w.probe(t0.Add(probeAfter)) {
		t.Fatalf("probed at %d notifications, below probeRate", perSpell-1)
	}
}

// TestProbeCountsNoIdleSpellAgainstARate: a session asleep over an idle outbox for a long time,
// then woken at probeRate, probes one window after the commits began, not once they made up for
// the idle spell (at 1,000 commits a second after 20 s idle, that took 5 s, each commit
// notifying and claimed alone meanwhile).
func TestProbeCountsNoIdleSpellAgainstARate(t *testing.T) {
	t0 := time.Unix(1000, 0)
	w := wakeState{probeFrom: t0}
	perSpell := int64(probeRate) * int64(probeAfter) / int64(time.Second)
	begin := t0.Add(20 * time.Second) // the first commit after the idle spell, and its claim
	w.heardN.Add(1)
	if w.probe(begin) {
		t.Fatal("probed at the first notification after 20 s asleep")
	}
	w.heardN.Add(perSpell)
	if w.probe(begin.Add(probeAfter / 2)) {
		t.Fatal("probed before the window after the idle spell was probeAfter long")
	}
	if !w.probe(begin.Add(probeAfter)) {
		t.Fatalf("no probe %s after %d notifications followed 20 s asleep", probeAfter, perSpell)
	}
}

// TestAsleepOnceAClaimRanAfterTheSleepLock: the session says it sleeps (relay.Sleeper, which
// lets the relay poll less often) only once it holds the sleep lock and a claim ran after it was
// granted: before that claim, a writer that skipped its notification may have committed rows
// nothing woke the relay for.
func TestAsleepOnceAClaimRanAfterTheSleepLock(t *testing.T) {
	s := &session{}
	s.wake.awake = true
	if s.Asleep() {
		t.Fatal("asleep without the sleep lock")
	}
	s.wake.asleep = true // the sleep lock granted (Wait)
	if s.Asleep() {
		t.Fatal("asleep before a claim ran after the sleep lock")
	}
	s.claimed(0)
	if !s.Asleep() {
		t.Fatal("not asleep with the sleep lock and a claim after it")
	}
}
