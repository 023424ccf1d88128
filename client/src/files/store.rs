//! The transfers' records as the state file keeps them (`parley_state::FileSendState`,
//! `FileReceiveState`): the offer with its key as a zeroizing secret, the positions, the
//! status. Nothing of a file's content, so the state file does not grow with a file.

use std::path::{Path, PathBuf};

use parley_state::{FileOfferState, FileReceiveState, FileSendState, FileStatusState, Secret};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::offer::FileOffer;
use super::receive::ReceiveRecord;
use super::send::SendRecord;
use super::{FileKey, parse_id};

pub fn offer_state(offer: &FileOffer) -> FileOfferState {
    FileOfferState {
        id: hex::encode(offer.id),
        name: offer.name.clone(),
        size: offer.size,
        sha256: offer.sha256.clone(),
        chunk: offer.chunk,
        key: Secret::new(hex::encode(offer.key.as_bytes())),
    }
}

/// `None` for a damaged record (an id or key that is not hex of the right length).
pub fn offer_from_state(state: &FileOfferState) -> Option<FileOffer> {
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(state.key.expose(), key.as_mut()).ok()?;
    Some(FileOffer {
        id: parse_id(&state.id)?,
        name: state.name.clone(),
        size: state.size,
        sha256: state.sha256.clone(),
        chunk: state.chunk,
        key: FileKey::from_bytes(*key),
    })
}

/// The statuses are tagged enums of the same shape as [`FileStatusState`] (`s`, and `code`
/// when failed): one conversion serves both ends.
fn status_state<T: Serialize>(status: &T) -> Option<FileStatusState> {
    serde_json::from_value(serde_json::to_value(status).ok()?).ok()
}

fn status_from_state<T: DeserializeOwned>(state: &FileStatusState) -> Option<T> {
    serde_json::from_value(serde_json::to_value(state).ok()?).ok()
}

pub fn send_state(record: &SendRecord, path: &Path) -> Option<FileSendState> {
    Some(FileSendState {
        offer: offer_state(&record.offer),
        path: path.to_path_buf(),
        pass: record.pass,
        acked: record.acked,
        status: status_state(&record.status)?,
    })
}

pub fn send_from_state(state: &FileSendState) -> Option<(SendRecord, PathBuf)> {
    Some((
        SendRecord {
            offer: offer_from_state(&state.offer)?,
            pass: state.pass,
            acked: state.acked,
            status: status_from_state(&state.status)?,
        },
        state.path.clone(),
    ))
}

pub fn receive_state(record: &ReceiveRecord, dir: &Path) -> Option<FileReceiveState> {
    Some(FileReceiveState {
        offer: offer_state(&record.offer),
        dir: dir.to_path_buf(),
        pass: record.pass,
        durable: record.durable,
        status: status_state(&record.status)?,
    })
}

pub fn receive_from_state(state: &FileReceiveState) -> Option<(ReceiveRecord, PathBuf)> {
    Some((
        ReceiveRecord {
            offer: offer_from_state(&state.offer)?,
            pass: state.pass,
            durable: state.durable,
            status: status_from_state(&state.status)?,
        },
        state.dir.clone(),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::FailCode;
    use super::super::receive::ReceiveStatus;
    use super::super::send::SendStatus;
    use super::*;

    pub(crate) fn offer() -> FileOffer {
        FileOffer {
            id: [0xa0; 16],
            name: "docs/hello.txt".into(),
            size: 11,
            sha256: "44".repeat(32),
            chunk: 4,
            key: FileKey::from_bytes([7; 32]),
        }
    }

    #[test]
    fn records_round_trip_through_the_state_file_shape() {
        for status in [
            SendStatus::Offered,
            SendStatus::Sending,
            SendStatus::Verifying,
            SendStatus::Done,
            SendStatus::Failed {
                code: FailCode::HashMismatch,
            },
        ] {
            let record = SendRecord {
                offer: offer(),
                pass: 2,
                acked: 1,
                status,
            };
            let state = send_state(&record, Path::new("/a/b")).unwrap();
            assert_eq!(
                send_from_state(&state).unwrap(),
                (record, PathBuf::from("/a/b"))
            );
        }
        for status in [
            ReceiveStatus::Offered,
            ReceiveStatus::Receiving,
            ReceiveStatus::Verified,
            ReceiveStatus::Done,
            ReceiveStatus::Failed {
                code: FailCode::Declined,
            },
        ] {
            let record = ReceiveRecord {
                offer: offer(),
                pass: 1,
                durable: 2,
                status,
            };
            let state = receive_state(&record, Path::new("/d")).unwrap();
            assert!(!state.status.s.is_empty());
            assert_eq!(
                receive_from_state(&state).unwrap(),
                (record, PathBuf::from("/d"))
            );
        }
        let mut damaged = offer_state(&offer());
        damaged.key = Secret::new("zz".into());
        assert!(offer_from_state(&damaged).is_none());
    }
}
