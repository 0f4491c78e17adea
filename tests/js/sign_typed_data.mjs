// Signs EIP-712 objects as served by GET /v1/signing (message filled in) with viem and with
// ethers v6, the way a wallet-side client does. Reads {"privateKey", "objects": [...]} as JSON on
// stdin; prints {"viem": [signature, ...], "ethers": [signature, ...]}.
import { privateKeyToAccount } from "viem/accounts";
import { Wallet } from "ethers";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { privateKey, objects } = JSON.parse(input);

const account = privateKeyToAccount(privateKey);
const wallet = new Wallet(privateKey);
const viem = [];
const ethers = [];
for (const served of objects) {
  viem.push(await account.signTypedData(served)); // the served object as it is
  // ethers refuses EIP712Domain among its types: the served object has them without it too.
  ethers.push(await wallet.signTypedData(served.domain, served.ethersTypes, served.message));
}
process.stdout.write(JSON.stringify({ viem, ethers }));
