//! Stop strings (OpenAI's `stop`) over streamed text. The engine stops on token ids only, so
//! the server watches the text: it holds back a tail that could begin a stop string, and cuts
//! the output where the first one starts (the stop string itself is not returned).

/// Streamed text checked against stop strings.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    /// Text received so far (cut at the stop string once one is found).
    text: String,
    /// Bytes of `text` handed out.
    emitted: usize,
    stopped: bool,
}

impl StopText {
    /// Watches for `stops` (none: text passes through unchanged).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text handed out so far.
    pub fn emitted(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// Adds a committed piece; returns the text that is now safe to send (possibly empty).
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped || piece.is_empty() {
            return String::new();
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A match wholly inside the old text would have been found already.
        let mut search_from = self.text.len().saturating_sub(longest.saturating_sub(1));
        self.text.push_str(piece);
        while !self.text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.text[search_from..].find(stop.as_str()))
            .min()
            .map(|at| search_from + at);
        let safe_end = match first_stop {
            Some(at) => {
                // Held-back prefixes keep a stop string from starting in sent text.
                let at = at.max(self.emitted);
                self.stopped = true;
                self.text.truncate(at);
                at
            }
            None => self.text.len() - self.held_back(),
        };
        let safe_end = safe_end.max(self.emitted);
        let out = self.text[self.emitted..safe_end].to_string();
        self.emitted = safe_end;
        out
    }

    /// The end of generation: `full_text` is the engine's decoded output. What it adds to the
    /// pieces seen (the last bytes of a character split across tokens) is checked too, then
    /// the held-back tail is released. Returns the text to send.
    pub fn finish(&mut self, full_text: &str) -> String {
        let mut out = String::new();
        if !self.stopped {
            if let Some(rest) = full_text.strip_prefix(self.text.as_str()) {
                out += &self.push(rest);
            }
        }
        if !self.stopped {
            out += &self.text[self.emitted..];
            self.emitted = self.text.len();
        }
        out
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let unsent = self.text.len() - self.emitted;
        self.stops
            .iter()
            .map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&k| stop.is_char_boundary(k))
                    .find(|&k| self.text.ends_with(&stop[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
            .min(unsent)
    }
}

#[cfg(test)]
mod tests {
    use super::StopText;

    /// Feeds `pieces`, then finishes with their concatenation; returns (sent, stopped).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut stop = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut sent = String::new();
        for piece in pieces {
            sent += &stop.push(piece);
        }
        sent += &stop.finish(&pieces.concat());
        assert_eq!(sent, stop.emitted());
        (sent, stop.stopped())
    }

    /// The reference: cut the whole text at the earliest occurrence of any stop string.
    fn reference(stops: &[&str], text: &str) -> (String, bool) {
        match stops.iter().filter_map(|s| text.find(s)).min() {
            Some(at) => (text[..at].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    #[test]
    fn matches_the_whole_text_reference_for_every_split() {
        let text = "def f():\n    return 1\n\nclass Ünïcode: pass\n";
        let stop_sets: [&[&str]; 5] = [&[], &["\n\n"], &["class", "return"], &["Ünï"], &["zzz"]];
        let boundaries: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for stops in stop_sets {
            for &a in &boundaries {
                for &b in boundaries.iter().filter(|&&b| b >= a) {
                    let pieces = [&text[..a], &text[a..b], &text[b..]];
                    assert_eq!(
                        run(stops, &pieces),
                        reference(stops, text),
                        "stops {stops:?}, split at {a} and {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn holds_back_a_possible_stop_prefix_until_it_is_resolved() {
        let mut stop = StopText::new(vec!["END".into()]);
        assert_eq!(stop.push("abc E"), "abc ");
        assert_eq!(stop.push("N"), "");
        assert_eq!(stop.push("X"), "ENX");
        assert_eq!(stop.push(" EN"), " ");
        assert_eq!(stop.push("D tail"), "");
        assert!(stop.stopped());
        assert_eq!(stop.emitted(), "abc ENX ");
    }

    #[test]
    fn finish_checks_text_the_pieces_did_not_carry() {
        // The engine holds back a split character; the full text brings the stop string.
        let mut stop = StopText::new(vec!["é!".into()]);
        assert_eq!(stop.push("ok "), "ok ");
        assert_eq!(stop.finish("ok é! more"), "");
        assert!(stop.stopped());
        assert_eq!(stop.emitted(), "ok ");
    }
}
